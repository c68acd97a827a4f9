"""Static GPU check of the shipped Triton kernels, runnable without a GPU.

Compiles every configuration listed by ``pyattn.kernels.<family>.gpu_compile_specs()`` for
sm_80 and sm_90 with ``triton.compile`` and runs ``ptxas -v`` on the PTX to read registers,
spills and shared memory. Must run with TRITON_INTERPRET unset (the interpreter replaces the
JIT functions). Usage: ``python -m pyattn.tools.gpu_static_check [family ...] [--json]``.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FAMILIES = ("rms_norm", "attention", "glu")
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def find_ptxas() -> str:
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env:
        return env
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("ptxas")
    if not found:
        raise FileNotFoundError("ptxas not found (set TRITON_PTXAS_PATH)")
    return found


def _ptxas_report(ptx: str, cc: int, ptxas: str) -> dict:
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([ptxas, "-v", f"-arch={arch}", str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        return dict(error=text[-2000:])
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_bytes=int(spill_st.group(1)) + int(spill_ld.group(1)) if spill_st and spill_ld else 0)


def check_spec(spec: dict, cc: int, ptxas: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec["fn"]
    constexprs = {(fn.arg_names.index(name),): value for name, value in spec["constexprs"].items()}
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=constexprs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    except Exception as exc:  # report compile failures as results, not crashes
        return dict(name=spec["name"], cc=cc, error=f"{type(exc).__name__}: {exc}"[-2000:])
    report = dict(name=spec["name"], cc=cc, shared_bytes=compiled.metadata.shared,
                  smem_limit=SMEM_LIMIT[cc], num_warps=spec["num_warps"], num_stages=spec["num_stages"])
    report.update(_ptxas_report(compiled.asm["ptx"], cc, ptxas))
    return report


def run(families=FAMILIES) -> list:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run the static GPU check with TRITON_INTERPRET unset")
    ptxas = find_ptxas()
    results = []
    for family in families:
        try:
            module = importlib.import_module(f"pyattn.kernels.{family}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pyattn.kernels.{family}":
                continue  # family without Triton kernels
            raise
        if not hasattr(module, "gpu_compile_specs"):
            continue
        for spec in module.gpu_compile_specs():
            for cc in (80, 90):
                results.append(dict(family=family, **check_spec(spec, cc, ptxas)))
    return results


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    families = [a for a in args if not a.startswith("--")] or list(FAMILIES)
    results = run(families)
    if as_json:
        print(json.dumps(results))
    else:
        for r in results:
            status = r.get("error", "ok")[:60]
            print(f"{r['name']:<40} sm_{r['cc']} regs={r.get('registers')} spill={r.get('spill_bytes')} "
                  f"smem={r.get('shared_bytes')} {status}")
    bad = [r for r in results if "error" in r or r.get("spill_bytes") or r.get("shared_bytes", 0) > r.get("smem_limit", 1 << 30)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
