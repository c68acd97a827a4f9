"""The GPU speed targets of pyattn, measured in one run (called by benchmarks/gpu_suite.sh).

bf16, D=128, B=2, H=16, N in {4096, 8192}, non-causal and causal: forward and forward+backward of
pyattn's triton and cuda backends against F.scaled_dot_product_attention (and flash-attn when
installed), with TFLOP/s as a fraction of the measured bf16 matmul peak of the same device.
Targets: forward >= 1.0x SDPA, backward (fwd+bwd) >= 0.9x SDPA. A missed target is reported, not
an error; an implementation that fails to run is an error (exit 1).

    python3 benchmarks/gpu_targets.py --out targets.csv [--markdown bench.md] [--dry-run]

``--dry-run`` runs the same code on CPU at a tiny size with the reference backend standing in.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import sys

import torch
import torch.nn.functional as F

FWD_TARGET, BWD_TARGET = 1.0, 0.9


def matmul_peak_tflops(device, dtype, n, median_ms) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, budget_s=0.5)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def impls(backends, causal):
    import pyattn

    out = {f"pyattn-{b}": (lambda q, k, v, b=b: pyattn.attention(q, k, v, causal=causal, backend=b))
           for b in backends}
    out["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    try:
        from flash_attn import flash_attn_func

        out["flash-attn"] = lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            causal=causal).transpose(1, 2)
    except Exception:
        pass
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--markdown", default=None, help="append a markdown table to this file")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, ".")
    from pyattn.bench.timing import median_ms

    if args.dry_run:
        device, dtype, B, H, D, Ns, backends, mm = torch.device("cpu"), torch.float32, 1, 2, 32, [128], ["reference"], 256
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
            return 2
        device, dtype, B, H, D, Ns, backends, mm = torch.device("cuda"), torch.bfloat16, 2, 16, 128, [4096, 8192], \
            ["triton", "cuda"], 8192
    peak = matmul_peak_tflops(device, dtype, mm, median_ms)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC | "
          f"matmul peak {peak:.1f} TFLOP/s ({str(dtype)[6:]}, n={mm})", flush=True)
    rows, errors = [], 0
    for causal in (False, True):
        for N in Ns:
            q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
            flops = 4 * B * H * N * N * D / (2 if causal else 1)
            g = torch.randn_like(q)
            times = {}
            for label, fn in impls(backends, causal).items():
                leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

                def fwd_bwd(fn=fn, leaves=leaves):
                    for t in leaves:
                        t.grad = None
                    fn(*leaves).backward(g)

                for mode, call, work in (("fwd", lambda fn=fn: fn(q, k, v), flops), ("fwd+bwd", fwd_bwd, 3.5 * flops)):
                    try:
                        ms = median_ms(call, device, budget_s=0.3, min_runs=3)
                    except Exception as exc:  # reported, and the step fails
                        print(f"{label} N{N} {mode}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
                        errors += label.startswith("pyattn")
                        continue
                    times[(label, mode)] = ms
                    tflops = work / (ms * 1e-3) / 1e12
                    rows.append(dict(device=name, dtype=str(dtype)[6:], B=B, H=H, N=N, D=D, causal=causal, impl=label,
                                     mode=mode, ms=round(ms, 4), tflops=round(tflops, 2),
                                     pct_of_matmul_peak=round(100 * tflops / peak, 1)))
            for row in rows:
                if row["N"] == N and row["causal"] == causal and (("sdpa", row["mode"]) in times):
                    sdpa_ms = times[("sdpa", row["mode"])]
                    row["x_vs_sdpa"] = round(sdpa_ms / row["ms"], 3)
                    if row["impl"].startswith("pyattn"):
                        target = FWD_TARGET if row["mode"] == "fwd" else BWD_TARGET
                        row["target"] = f">= {target}x SDPA: {'met' if row['x_vs_sdpa'] >= target else 'NOT met'}"
    fields = ["device", "dtype", "B", "H", "N", "D", "causal", "impl", "mode", "ms", "tflops", "pct_of_matmul_peak",
              "x_vs_sdpa", "target"]
    with open(args.out, "w", newline="") as f:
        f.write(f"# {name} | torch {torch.__version__} | matmul peak {peak:.1f} TFLOP/s\n")
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    lines = ["| N | causal | impl | mode | ms | TFLOP/s | % peak | x vs SDPA | target |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['N']} | {r['causal']} | {r['impl']} | {r['mode']} | {r['ms']} | {r['tflops']} | "
                     f"{r['pct_of_matmul_peak']} | {r.get('x_vs_sdpa', '')} | {r.get('target', '')} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"## targets ({name}, {str(dtype)[6:]}, D={D}; matmul peak {peak:.1f} TFLOP/s)\n\n{table}\n\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
