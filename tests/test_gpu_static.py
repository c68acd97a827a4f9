"""Static GPU check, without a GPU (pyattn/tools/gpu_static_check.py, representative set): the
Triton launches the public API makes are compiled for sm_80 and sm_90 as Triton's launcher
specialises them (tt.divisibility=16 on aligned pointers and strides), ptxas reports no spills,
the real shared memory fits each arch, and on sm_90 the attention dots lower to wgmma.
The full list: ``python -m pyattn.tools.gpu_static_check --all``."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "pyattn.tools.gpu_static_check", "--json", "--jobs", "2"], env=env,
                         capture_output=True, text=True, timeout=1200)
    lines = [line for line in res.stdout.splitlines() if line.startswith("[")]
    assert lines, f"static check produced no report:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return json.loads(lines[-1])


def _find(rows, kernel, cc, case_part):
    found = [r for r in rows if r["kernel"] == kernel and r["cc"] == cc and any(case_part in c for c in r["cases"])]
    assert found, f"no {kernel} sm_{cc} row for a case containing {case_part!r}"
    return found[0]


def test_every_family_and_arch(rows):
    assert {r["family"] for r in rows} == {"attention", "rms_norm", "glu"}
    for fam in ("attention", "rms_norm", "glu"):
        assert {r["cc"] for r in rows if r["family"] == fam} == {80, 90}


def test_no_spills_shared_memory_fits_wgmma(rows):
    bad = [r for r in rows if r["problems"]]
    assert not bad, "\n".join(f"{r['kernel']} sm_{r['cc']} {r['cases']}: {r['problems']}" for r in bad)
    assert all(r["registers"] and r["shared_bytes"] <= r["smem_limit"] for r in rows)


def test_compiled_with_launch_specialisation(rows):
    fwd = _find(rows, "_attention_fwd_kernel", 90, "_plain")
    assert {"Q", "K", "V", "Out", "stride_qm", "stride_kn"} <= set(fwd["divisibility_args"]), fwd["divisibility_args"]
    assert fwd["ptx_cp_async"] > 0  # aligned 16-byte async copies: what the specialised kernel does
    assert fwd["shared_bytes"] >= 32 * 1024  # the pipelined K/V buffers, not only the reduction scratch


def test_hopper_dots_lower_to_wgmma(rows):
    for kernel in ("_attention_fwd_kernel", "_attention_bwd_dq_kernel"):
        r = _find(rows, kernel, 90, "_d128_all")
        assert r["wgmma_dots"] > 0 and r["mma_sync_dots"] == 0, r
    dkdv = _find(rows, "_attention_bwd_dkdv_kernel", 90, "_d128_all")
    assert dkdv["wgmma_dots"] > 0, dkdv
    assert all(r["ptx_wgmma"] == 0 for r in rows if r["cc"] == 80)


def test_pipelined_attention_configs(rows):
    for r in rows:
        if r["kernel"] in ("_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel"):
            assert r["config"]["num_stages"] >= 2, r
