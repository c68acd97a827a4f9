"""Loading local Hugging Face decoder checkpoints into pyattn models (no network, no unpickling).

Weights come from ``model.safetensors`` (or the shards named by ``model.safetensors.index.json``),
or from ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch
from torch import Tensor


def read_hf_state_dict(path) -> Dict[str, Tensor]:
    """All tensors of the checkpoint in directory ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"path must be a local checkpoint directory, got {str(path)!r}")
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists() or single.exists():
        from safetensors.torch import load_file

        if single.exists():
            return load_file(str(single))
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: Dict[str, Tensor] = {}
        for shard in shards:
            out.update(load_file(str(path / shard)))
        return out
    binary = path / "pytorch_model.bin"
    if binary.exists():
        return torch.load(str(binary), map_location="cpu", weights_only=True)
    raise ValueError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {str(path)!r}")


def llama_state_dict_from_hf(sd: Dict[str, Tensor], num_layers: int, tied: bool) -> Dict[str, Tensor]:
    """Hugging Face ``LlamaForCausalLM`` names -> :class:`pyattn.models.llama.LlamaForCausalLM` names.

    The MLP's gate_proj and up_proj rows are stacked into ``mlp.gate_up_proj`` (one GEMM).
    """
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
    out: Dict[str, Tensor] = {}
    for k, v in sd.items():
        if ".mlp.gate_proj." in k or ".mlp.up_proj." in k or k.endswith("rotary_emb.inv_freq"):
            continue
        if ".mlp.down_proj.weight" in k:
            out[k.replace("down_proj.weight", "down_proj")] = v
        elif ".mlp.down_proj.bias" in k:
            out[k.replace("down_proj.bias", "down_bias")] = v
        else:
            out[k] = v
    for i in range(num_layers):
        pre = f"layers.{i}.mlp."
        for kind, name in (("weight", "gate_up_proj"), ("bias", "gate_up_bias")):
            g, u = sd.get(f"{pre}gate_proj.{kind}"), sd.get(f"{pre}up_proj.{kind}")
            if g is not None and u is not None:
                out[pre + name] = torch.cat([g, u], dim=0)
    if tied:
        out.pop("lm_head.weight", None)
    return out


def load_llama(cls, path, **overrides):
    from .llama import LlamaConfig

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"no config.json in {str(path)!r}")
    config = LlamaConfig.from_hf_dict(json.loads(cfg_file.read_text()), **overrides)
    model = cls(config)
    sd = llama_state_dict_from_hf(read_hf_state_dict(path), config.num_hidden_layers, config.tie_word_embeddings)
    expected = set(model.state_dict().keys())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint in {str(path)!r} does not match the {config.num_hidden_layers}-layer model: "
                         f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    model.load_state_dict(sd, strict=False)
    dtype = next(iter(sd.values())).dtype if sd else torch.float32
    return model.to(dtype if dtype.is_floating_point else torch.float32)
