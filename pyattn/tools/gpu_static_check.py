"""Static GPU check of the shipped Triton kernels, runnable without a GPU.

The kernels are compiled exactly as they will run: the public API is called with CPU tensors
(``pyattn.tools.gpu_cases``) while the kernels record their launches (``launch_capture``), each
launch is specialised by Triton's own binder for the target (``tt.divisibility=16`` on aligned
pointers and on strides that are multiples of 16, the config table of that arch), and compiled
with ``triton.compile`` for sm_80 and sm_90. Per compiled kernel it reports registers and spills
(``ptxas -v`` with Triton's flags on the generated PTX), the real shared memory (compiled
metadata), the dots and how they lower (ttgir: ``ttng.warp_group_dot`` = wgmma, ``tt.dot`` =
mma.sync) and the async copies in the PTX (cp.async, TMA bulk copies).

Fails (exit 1) on compile errors, spills, shared memory over the arch's limit (sm_80 163 KB,
sm_86 99 KB, sm_90 227 KB), and on sm_90 fp16/bf16 attention at head dim <= 128 when a forward or
dq dot does not lower to wgmma, or no dK/dV-kernel dot does.

Usage (TRITON_INTERPRET must be unset)::

    python -m pyattn.tools.gpu_static_check            # representative set (the test suite's)
    python -m pyattn.tools.gpu_static_check --all      # every shipped config
    options: --family attention,rms_norm,glu  --arch 80,90[,86]  --filter SUBSTR  --jobs N  --json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
DEFAULT_ARCHS = (80, 90)
# every dot on wgmma (sm_90, fp16/bf16, head dim <= 128); dK/dV: at least its dK/dV dots (M = BLOCK_N)
WGMMA_ALL_DOTS = ("_attention_fwd_kernel", "_attention_bwd_dq_kernel")
WGMMA_SOME_DOTS = ("_attention_bwd_dkdv_kernel",)


# --------------------------------------------------------------------------------------------
# collect: run the cases, specialise their launches per arch
# --------------------------------------------------------------------------------------------
def collect(cases, archs) -> list:
    from ..kernels import attention_configs
    from .launch_capture import capture, specialise, unique

    families = sorted({c.family for c in cases})
    specs = []
    current = [""]
    for cc in archs:
        with capture(families, current) as launches, attention_configs.target_arch(cc):
            for case in cases:
                current[0] = case.name
                case.run()
        specs.extend(specialise(launch, cc) for launch in launches)
    return unique(specs)


# --------------------------------------------------------------------------------------------
# compile + analyse one specialised kernel
# --------------------------------------------------------------------------------------------
def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def _ptxas_report(ptx: str, cc: int) -> dict:
    """Registers and spills of the PTX, from ptxas -v run as Triton runs it (same binary, flags)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(cc).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(cc)}", str(src),
                              "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        return dict(error="ptxas: " + text[-2000:])
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_bytes=int(spill.group(1)) + int(spill.group(2)) if spill else None,
                stack_bytes=int(stack.group(1)) if stack else None)


def _config_of(spec) -> dict:
    ce = spec.constexpr_values()
    cfg = {k: ce[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_K", "BLOCK_T", "BLOCK_I") if k in ce}
    cfg["num_warps"] = spec.options.get("num_warps")
    cfg["num_stages"] = spec.options.get("num_stages")
    return cfg


def wgmma_expected(spec) -> str:
    """"all", "some" or "" (no expectation): the wgmma lowering required of this kernel on sm_90."""
    if spec.cc != 90 or spec.signature.get("Q") not in ("*fp16", "*bf16"):
        return ""
    if spec.constexpr_values().get("BLOCK_D", 1 << 30) > 128:
        return ""
    return "all" if spec.kernel in WGMMA_ALL_DOTS else "some" if spec.kernel in WGMMA_SOME_DOTS else ""


def analyse(spec) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(family=spec.fn.fn.__module__.rsplit(".", 1)[-1], kernel=spec.kernel, cc=spec.cc,
               cases=list(spec.cases), config=_config_of(spec), smem_limit=SMEM_LIMIT[spec.cc],
               dtype=next((t for n, t in spec.signature.items() if t.startswith("*")), "?")[1:],
               divisibility_args=sorted(spec.fn.arg_names[p[0]] for p in spec.attrs),
               wgmma_expected=wgmma_expected(spec))
    t0 = time.time()
    try:
        compiled = triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs),
                                  target=GPUTarget("cuda", spec.cc, 32), options=spec.options)
    except Exception as exc:  # a failing config is a result to report, not a crash
        row["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        return row
    ttir, ttgir, ptx = compiled.asm["ttir"], compiled.asm["ttgir"], compiled.asm["ptx"]
    row.update(
        compile_s=round(time.time() - t0, 1),
        shared_bytes=int(compiled.metadata.shared),
        dots=_count(r"\btt\.dot\b(?!_)", ttir),
        wgmma_dots=_count(r"\bttng\.warp_group_dot\b(?!_)", ttgir),
        mma_sync_dots=_count(r"\btt\.dot\b(?!_)", ttgir),
        ptx_wgmma=_count(r"\bwgmma\.mma_async\b", ptx),
        ptx_mma_sync=_count(r"\bmma\.sync\b", ptx),
        ptx_cp_async=_count(r"\bcp\.async\.c[ag]\b", ptx),
        ptx_tma=_count(r"\bcp\.async\.bulk\b", ptx),
        ptx_ldmatrix=_count(r"\bldmatrix\b", ptx),
    )
    row.update(_ptxas_report(ptx, spec.cc))
    return row


def problems(row: dict) -> List[str]:
    """Why a row fails the check (empty when it passes)."""
    if "error" in row:
        return [row["error"].splitlines()[0][:200]]
    out = []
    if row.get("registers") is None or row.get("spill_bytes") is None:
        out.append("no ptxas register/spill report")
    if row.get("spill_bytes"):
        out.append(f"spills {row['spill_bytes']} B")
    if row.get("shared_bytes", 0) > row["smem_limit"]:
        out.append(f"shared memory {row['shared_bytes']} B > {row['smem_limit']} B")
    want = row.get("wgmma_expected")
    if want and not row.get("wgmma_dots"):
        out.append(f"no dot lowers to wgmma ({row.get('mma_sync_dots')} mma.sync)")
    elif want == "all" and row.get("mma_sync_dots"):
        out.append(f"dots not all wgmma ({row.get('wgmma_dots')} wgmma, {row.get('mma_sync_dots')} mma.sync)")
    return out


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
_SPECS: list = []


def _analyse_index(i: int) -> dict:
    return analyse(_SPECS[i])


def run(families=None, archs=DEFAULT_ARCHS, all_cases=False, name_filter=None, jobs=None) -> List[Dict]:
    """Compile and analyse; returns one row per unique compiled kernel."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run the static GPU check with TRITON_INTERPRET unset")
    from .gpu_cases import FAMILIES, all_cases as cases_of

    cases = cases_of(tuple(families or FAMILIES))
    if not all_cases:
        cases = [c for c in cases if c.ci]
    if name_filter:
        cases = [c for c in cases if name_filter in c.name]
    global _SPECS
    _SPECS = collect(cases, archs)
    jobs = jobs or min(len(_SPECS), os.cpu_count() or 1) or 1
    if jobs > 1:
        # fork: workers inherit the collected specs (JIT functions do not pickle)
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(_analyse_index, range(len(_SPECS)), chunksize=1)
    else:
        rows = [_analyse_index(i) for i in range(len(_SPECS))]
    for row in rows:
        row["problems"] = problems(row)
    return rows


def format_row(r: dict) -> str:
    cfg = r["config"]
    tiles = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D") if k in cfg) or \
        "x".join(str(v) for k, v in cfg.items() if k.startswith("BLOCK"))
    head = f"{r['kernel']:<30} sm_{r['cc']} {r['dtype']:<5} {tiles:<12} w{cfg['num_warps']} s{cfg['num_stages']}"
    if "error" in r:
        return f"{head} ERROR {r['error'].splitlines()[0][:100]}"
    dots = ""
    if r["dots"]:
        dots = f" dots={r['dots']} wgmma={r['wgmma_dots']} mma={r['mma_sync_dots']}"
    status = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
    return (f"{head} regs={r['registers']} spill={r['spill_bytes']} smem={r['shared_bytes'] // 1024}K"
            f"/{r['smem_limit'] // 1024}K cp.async={r['ptx_cp_async']} tma={r['ptx_tma']}{dots} "
            f"[{r['cases'][0]}{' +%d' % (len(r['cases']) - 1) if len(r['cases']) > 1 else ''}] {status}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyattn.tools.gpu_static_check", description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="every shipped config (default: the representative set)")
    ap.add_argument("--family", default=None, help="comma-separated: attention,rms_norm,glu")
    ap.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)), help="comma-separated: 80,86,90")
    ap.add_argument("--filter", default=None, help="only cases whose name contains this")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    args = ap.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    for cc in archs:
        if cc not in SMEM_LIMIT:
            ap.error(f"--arch must be among {sorted(SMEM_LIMIT)}, got {cc}")
    families = args.family.split(",") if args.family else None
    t0 = time.time()
    rows = run(families, archs, args.all, args.filter, args.jobs)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in sorted(rows, key=lambda r: (r["family"], r["kernel"], r["cc"], r["cases"][0])):
            print(format_row(r))
        bad = sum(bool(r["problems"]) for r in rows)
        print(f"{len(rows)} kernels compiled in {time.time() - t0:.0f} s, {bad} failing")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
