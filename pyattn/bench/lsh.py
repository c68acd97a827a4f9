"""LSH attention (Reformer) benchmark rows: pyattn.lsh_attention (forward + backward) against
transformers' LSHSelfAttention on the same projected inputs and rotations, reformer-pytorch's
LSHAttention when installed, and dense causal SDPA on the same qk / v. Peak memory on CPU is
measured per implementation in a fresh process (``python -m pyattn.bench.lsh N impl`` prints
seconds and peak-RSS growth)."""
from __future__ import annotations

from typing import List

import torch

from .cases import Case, suite

H, D, R, L = 8, 64, 4, 64


def _hf_lsh(N, device):
    import transformers
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    transformers.logging.set_verbosity_error()
    cfg = transformers.ReformerConfig(hidden_size=H * D, num_attention_heads=H, attention_head_size=D,
                                      lsh_attn_chunk_length=L, num_hashes=R, num_buckets=2 * N // L // 2 * 2,
                                      lsh_num_chunks_before=1, lsh_num_chunks_after=0, is_decoder=True, hash_seed=0,
                                      lsh_attention_probs_dropout_prob=0.0, max_position_embeddings=N)
    return LSHSelfAttention(cfg).to(device)


def _case(device, N) -> Case:
    import pyattn

    x = torch.randn(1, N, H * D, device=device, requires_grad=True)
    qk = torch.randn(1, H, N, D, device=device, requires_grad=True)
    v = torch.randn(1, H, N, D, device=device, requires_grad=True)
    nbk = 2 * N // L // 2 * 2
    rot = pyattn.lsh.draw_rotations(H, D, R, nbk, seed=0, device=device)
    impls = {
        "pyattn": lambda: pyattn.lsh_attention(qk, v, n_hashes=R, n_buckets=nbk, chunk_length=L, causal=True,
                                               rotations=rot).sum().backward(),
        "sdpa_dense_causal": lambda: torch.nn.functional.scaled_dot_product_attention(
            qk, qk, v, is_causal=True).sum().backward(),
    }
    try:
        hf = _hf_lsh(N, device)
        impls["hf_reformer"] = lambda: hf(x).hidden_states.sum().backward()
    except ImportError:
        pass
    try:  # reformer-pytorch, when installed
        from reformer_pytorch import LSHAttention

        rp = LSHAttention(bucket_size=L, n_hashes=R, causal=True)
        qk3, v3 = qk.reshape(H, N, D), v.reshape(H, N, D)
        impls["reformer_pytorch"] = lambda: rp(qk3, qk3, v3)[0].sum().backward()
    except ImportError:
        pass
    flops = 4 * H * N * (2 * L) * D * R * 3.5  # fwd + bwd (2.5x) over the 2-chunk window
    return Case(op="lsh_attention", mode="fwd+bwd", config=f"N={N} H={H} D={D} R={R} L={L} causal",
                dtype="float32", impls=impls, work=flops, unit="TFLOP/s")


@suite("lsh")
def cases(device: torch.device, quick: bool) -> List[Case]:
    return [_case(device, N) for N in ((4096,) if quick else (4096, 16384, 65536))]


def _measure_main(argv):
    """One implementation in a fresh process: wall seconds of one fwd+bwd after a warm-up, and the
    growth of the process's peak RSS over warm-up + run (MiB)."""
    import resource
    import time

    N, name = int(argv[0]), argv[1]
    case = _case(torch.device("cpu"), N)
    fn = case.impls[name]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{name} N={N} {dt:.3f} s peak_rss_growth_MiB={(peak - base) / 1024:.0f}")


if __name__ == "__main__":
    import sys

    _measure_main(sys.argv[1:])
