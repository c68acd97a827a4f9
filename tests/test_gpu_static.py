"""Static GPU check, without a GPU: every shipped Triton kernel config compiles for sm_80 and
sm_90, ptxas reports no register spills and shared memory fits the device."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def static_report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "pyattn.tools.gpu_static_check", "--json"], env=env,
                         capture_output=True, text=True, timeout=1200)
    lines = [line for line in res.stdout.splitlines() if line.startswith("[")]
    assert lines, f"static check produced no report:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return json.loads(lines[-1])


def test_every_family_has_configs(static_report):
    families = {r["family"] for r in static_report}
    assert "rms_norm" in families
    for fam in families:
        assert {r["cc"] for r in static_report if r["family"] == fam} == {80, 90}


def test_configs_compile_without_spills(static_report):
    bad = [r for r in static_report if "error" in r or r.get("spill_bytes", 0) > 0
           or r.get("registers") is None]
    assert not bad, "\n".join(f"{r['name']} sm_{r['cc']}: {r.get('error') or r}" for r in bad)


def test_shared_memory_fits(static_report):
    over = [r for r in static_report if r["shared_bytes"] > r["smem_limit"]]
    assert not over, [(r["name"], r["cc"], r["shared_bytes"]) for r in over]
