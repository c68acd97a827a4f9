"""LSH attention (Reformer) benchmark rows: pyattn.lsh_attention (forward + backward) against
transformers' LSHSelfAttention on the same projected inputs and rotations, reformer-pytorch's
LSHAttention when installed, and dense causal SDPA on the same qk / v. Peak memory on CPU is
measured per implementation in a fresh process (``python -m pyattn.bench.lsh N impl`` prints
seconds and peak-RSS growth).

ReformerLM rows (``--full`` only): one training step (forward + backward) against depth with the
reversible stack, the same model with ordinary backprop, and transformers' ReformerModelWithLMHead
of the same config; peak memory per implementation (``python -m pyattn.bench.lsh reformer DEPTH impl``
in a fresh process)."""
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


RF_N, RF_E, RF_H, RF_D, RF_F, RF_V = 4096, 256, 4, 64, 512, 320
RF_DEPTHS = (2, 4, 8)


def _reformer_kwargs(depth: int) -> dict:
    return dict(vocab_size=RF_V, hidden_size=RF_E, num_attention_heads=RF_H, attention_head_size=RF_D,
                attn_layers=["local", "lsh"] * (depth // 2), feed_forward_size=RF_F, axial_pos_shape=[64, 64],
                axial_pos_embds_dim=[64, 192], lsh_attn_chunk_length=64, local_attn_chunk_length=64, num_hashes=2,
                num_buckets=64, hash_seed=0, is_decoder=True, max_position_embeddings=RF_N, hidden_dropout_prob=0.0,
                local_attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0)


def _reformer_case(device, depth: int) -> Case:
    from ..models import ReformerConfig, ReformerLM

    ids = torch.randint(1, RF_V, (1, RF_N), generator=torch.Generator().manual_seed(0)).to(device)

    def step(build):
        model = []  # built on the first (warm-up) call: listing the suite allocates nothing

        def run():
            if not model:
                torch.manual_seed(0)
                model.append(build().to(device).train())
            model[0](ids, labels=ids).loss.backward()
        return run

    impls = {"pyattn": step(lambda: ReformerLM(ReformerConfig(**_reformer_kwargs(depth)))),
             "plain_backprop": step(lambda: ReformerLM(ReformerConfig(**_reformer_kwargs(depth), reversible=False)))}
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        impls["hf_reformer"] = step(lambda: transformers.ReformerModelWithLMHead(
            transformers.ReformerConfig(**_reformer_kwargs(depth))))
    except ImportError:
        pass
    # matmul FLOPs of a training step (3x forward): projections, feed-forward, LM head; attention windows
    per_layer = 2 * RF_N * RF_E * (RF_H * RF_D) * 3.5 + 4 * RF_N * RF_E * RF_F
    attn = 4 * RF_H * RF_N * 128 * RF_D * 1.5  # 2-chunk windows (LSH: per hash round, about the same)
    work = 3 * (depth * (per_layer + attn) + 2 * RF_N * 2 * RF_E * RF_V)
    return Case(op="reformer_lm", mode="train step", config=f"N={RF_N} E={RF_E} depth={depth} local+lsh",
                dtype="float32", impls=impls, work=work, unit="TFLOP/s", params={"depth": depth}, x="depth",
                x_label="layers (alternating local / LSH)", figure="reformer_lm_memory", tier="full",
                measure_memory=True, notes={"model": "H=4 D=64 F=512 V=320, 2 hashes, chunk 64, B=1"})


@suite("lsh")
def cases(device: torch.device, quick: bool) -> List[Case]:
    out = [_case(device, N) for N in ((4096,) if quick else (4096, 16384, 65536))]
    if not quick:  # full scope only (tier "full"): the default run's budget is unchanged
        out += [_reformer_case(device, d) for d in RF_DEPTHS]
    return out


def _measure_main(argv):
    """One implementation in a fresh process: wall seconds of one fwd+bwd after a warm-up, and the
    growth of the process's peak RSS over warm-up + run (MiB)."""
    import resource
    import time

    if argv[0] == "reformer":
        depth, name = int(argv[1]), argv[2]
        case, N = _reformer_case(torch.device("cpu"), depth), f"{RF_N} depth={depth}"
    else:
        N, name = int(argv[0]), argv[1]
        case = _case(torch.device("cpu"), N)
    fn = case.impls[name]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = f"{name} N={N} {dt:.3f} s peak_rss_growth_MiB={(peak - base) / 1024:.0f}"
    if argv[0] == "reformer":  # the step alone, above the weights and gradients the warm-up left
        line += f" step_peak_alloc_MiB={_peak_alloc_bytes(fn) / 2 ** 20:.0f}"
    print(line)


def _peak_alloc_bytes(fn) -> int:
    """Peak of the live CPU allocations made while ``fn`` runs (torch profiler events): unlike the
    RSS high-water mark it does not hide memory the allocator reuses from an earlier call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for _, delta in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
        cur += delta
        peak = max(peak, cur)
    return peak


if __name__ == "__main__":
    import sys

    _measure_main(sys.argv[1:])
