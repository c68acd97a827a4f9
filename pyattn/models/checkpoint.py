"""Hugging Face checkpoints for the BERT family: load (no network) and save.

``from_pretrained(local_dir)`` reads ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` loaded with ``weights_only=True``:
never unpickling code). ``from_hf_state_dict(state_dict, config)`` maps Hugging Face parameter
names to pyattn's (Q, K and V concatenated into one ``qkv`` matrix) and names every missing,
unexpected or mis-shaped key in its error. ``save_pretrained`` writes the inverse: a directory
transformers' ``AutoModel*.from_pretrained`` loads.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor

from .bert import (BertConfig, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification, BertModel,
                   PreTrainedEncoder)
from .families import (AlbertConfig, AlbertForMaskedLM, AlbertForPreTraining, AlbertModel, ElectraConfig,
                       ElectraDiscriminator, ElectraForMaskedLM, ElectraModel, RobertaConfig, RobertaForMaskedLM,
                       RobertaModel)

CONFIGS = {c.model_type: c for c in (BertConfig, RobertaConfig, AlbertConfig, ElectraConfig)}
MODEL_CLASSES: Dict[str, Type[PreTrainedEncoder]] = {c.hf_architecture: c for c in (
    BertModel, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification, RobertaModel, RobertaForMaskedLM,
    AlbertModel, AlbertForMaskedLM, AlbertForPreTraining, ElectraModel, ElectraForMaskedLM, ElectraDiscriminator)}
BASE_MODEL = {"bert": BertModel, "roberta": RobertaModel, "albert": AlbertModel, "electra": ElectraModel}

# ---- name tables: pyattn module path -> Hugging Face module path (the .weight/.bias suffix is kept)
_EMBEDDINGS = {"word": "word_embeddings", "position": "position_embeddings",
               "token_type": "token_type_embeddings", "norm": "LayerNorm"}
_BERT_LAYER = ("encoder.layer.{i}.", {
    "attn.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attn.out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "ffn.up": "intermediate.dense", "ffn.down": "output.dense", "ffn_norm": "output.LayerNorm"})
_ALBERT_LAYER = ("encoder.albert_layer_groups.{i}.albert_layers.0.", {
    "attn.qkv": ("attention.query", "attention.key", "attention.value"),
    "attn.out": "attention.dense", "attn_norm": "attention.LayerNorm",
    "ffn.up": "ffn", "ffn.down": "ffn_output", "ffn_norm": "full_layer_layer_norm"})
_PROJECT = {"albert": "encoder.embedding_hidden_mapping_in", "electra": "embeddings_project"}
# MLM head: (dense, LayerNorm, bias parameter, tied decoder module)
_MLM = {"bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias",
                 "cls.predictions.decoder"),
        "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias", "lm_head.decoder"),
        "albert": ("predictions.dense", "predictions.LayerNorm", "predictions.bias", "predictions.decoder"),
        "electra": ("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head.bias",
                    "generator_lm_head")}
_SENTENCE = {"bert": "cls.seq_relationship", "albert": "sop_classifier.classifier"}
_HEADS = {"classifier": "classifier", "head.dense": "discriminator_predictions.dense",
          "head.out": "discriminator_predictions.dense_prediction"}
_IGNORED = re.compile(r"(^|\.)(position_ids|token_type_ids)$")  # buffers of older checkpoints


def _hf_module(path: str, family: str) -> Tuple[str, ...]:
    """pyattn module path (base-model part without the ``model.`` prefix) -> HF module path(s)."""
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", path)
    if m:
        prefix, table = _ALBERT_LAYER if family == "albert" else _BERT_LAYER
        target = table[m.group(2)]
        targets = target if isinstance(target, tuple) else (target,)
        return tuple(prefix.format(i=m.group(1)) + t for t in targets)
    if path.startswith("embeddings."):
        sub = path[len("embeddings."):]
        return (_PROJECT[family],) if sub == "project" else ("embeddings." + _EMBEDDINGS[sub],)
    if path == "pooler.dense":
        return ("pooler",) if family == "albert" else ("pooler.dense",)
    if path in ("mlm.dense", "mlm.norm"):
        return (_MLM[family][0 if path == "mlm.dense" else 1],)
    if path == "sentence":
        return (_SENTENCE.get(family, _SENTENCE["bert"]),)
    if path in _HEADS:
        return (_HEADS[path],)
    raise KeyError(path)


def hf_names(key: str, family: str) -> Tuple[Tuple[str, ...], bool]:
    """pyattn state-dict key -> (HF keys, whether they belong to the base model)."""
    base = key.startswith("model.") or key.split(".")[0] in ("embeddings", "encoder", "pooler")
    key = key[len("model."):] if key.startswith("model.") else key
    if key == "mlm.bias":
        return (_MLM[family][2],), False
    path, param = key.rsplit(".", 1)
    return tuple(f"{m}.{param}" for m in _hf_module(path, family)), base


def _tied_decoder_keys(family: str) -> Tuple[str, ...]:
    dec = _MLM[family][3]
    return (f"{dec}.weight",) if family == "electra" else (f"{dec}.weight", f"{dec}.bias")


def infer_model_class(keys, family: str) -> Type[PreTrainedEncoder]:
    """The pyattn class whose heads match the state dict's keys."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    mlm = has(_MLM[family][0])
    if has("discriminator_predictions."):
        return ElectraDiscriminator
    if has("classifier.") and family == "bert":
        return BertForSequenceClassification
    if mlm and has(_SENTENCE.get(family, "cls.seq_relationship")):
        return {"bert": BertForPreTraining, "albert": AlbertForPreTraining}[family]
    if mlm:
        return {"bert": BertForMaskedLM, "roberta": RobertaForMaskedLM, "albert": AlbertForMaskedLM,
                "electra": ElectraForMaskedLM}[family]
    return BASE_MODEL[family]


def from_hf_state_dict(state_dict: Dict[str, Tensor], config: BertConfig,
                       model_class: Optional[Type[PreTrainedEncoder]] = None, strict: bool = True):
    """Build a pyattn model from a Hugging Face state dict.

    ``config`` is a pyattn config (``config_from_hf`` converts a Hugging Face config.json dict);
    ``model_class`` defaults to the class whose heads the keys contain. Raises ValueError naming
    the missing keys, the unexpected ones (unless ``strict=False``: heads of another architecture
    are then dropped) and any shape mismatch.
    """
    if not isinstance(config, BertConfig):
        raise TypeError(f"config must be a pyattn.models config (BertConfig, RobertaConfig, ...), "
                        f"got {type(config).__name__}")
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    family = config.model_type
    prefix = BASE_MODEL[family].__name__.replace("Model", "").lower() + "."
    hf = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
    model_class = model_class or infer_model_class(hf, family)
    model = model_class(config)
    ours, missing, used = {}, [], set()
    for key, param in model.state_dict().items():
        names, _ = hf_names(key, family)
        absent = [n for n in names if n not in hf]
        if absent:  # the present parts of an incomplete q/k/v group are not "unexpected"
            missing += absent
            used.update(n for n in names if n in hf)
            continue
        value = torch.cat([hf[n] for n in names]) if len(names) > 1 else hf[names[0]]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"state_dict: {' + '.join(names)} has shape {tuple(value.shape)}, the model "
                             f"({model_class.__name__}, {config.model_type}) expects {tuple(param.shape)} for {key}")
        ours[key] = value
        used.update(names)
    ignored = set(_tied_decoder_keys(family)) if any(k.startswith("mlm.") for k in model.state_dict()) else set()
    unexpected = sorted(k for k in hf if k not in used and k not in ignored and not _IGNORED.search(k))
    if missing or (unexpected and strict):
        parts = []
        if missing:
            parts.append(f"missing keys {sorted(set(missing))}")
        if unexpected and strict:
            parts.append(f"unexpected keys {unexpected}")
        raise ValueError(f"state_dict does not match {model_class.__name__} ({family}): " + "; ".join(parts))
    model.load_state_dict(ours, strict=True)
    return model


# ------------------------------------------------------------------------------------------------
# config.json and weight files
# ------------------------------------------------------------------------------------------------

def config_from_hf(hf: dict, **overrides) -> BertConfig:
    """A pyattn config from a Hugging Face config.json dict (``overrides`` win, e.g. backend=)."""
    model_type = hf.get("model_type")
    if model_type not in CONFIGS:
        raise ValueError(f"config.json model_type must be one of {sorted(CONFIGS)}, got {model_type!r}")
    pos = hf.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ValueError(f"config.json position_embedding_type must be 'absolute', got {pos!r}")
    if hf.get("inner_group_num", 1) != 1:
        raise ValueError(f"config.json inner_group_num must be 1 (one layer per ALBERT group), got {hf['inner_group_num']}")
    cls = CONFIGS[model_type]
    kwargs = {f: hf[f] for f in cls.field_names() if f in hf and f not in ("backend", "head_act")}
    if model_type == "bert":
        kwargs.pop("embedding_size", None)
    if "id2label" in hf and "num_labels" not in hf:
        kwargs["num_labels"] = len(hf["id2label"])
    kwargs.update(overrides)
    return cls(**kwargs)


def config_to_hf(config: BertConfig, architecture: str) -> dict:
    out = {f: getattr(config, f) for f in config.field_names() if f not in (
        "backend", "head_act", "positions_from_padding", "num_hidden_groups", "embedding_size", "num_labels")}
    out.update(model_type=config.model_type, architectures=[architecture], position_embedding_type="absolute")
    if config.model_type in ("albert", "electra"):
        out["embedding_size"] = config.emb_size
    if config.model_type == "albert":
        out.update(num_hidden_groups=config.num_hidden_groups or config.num_hidden_layers, inner_group_num=1)
    elif config.num_hidden_groups not in (None, config.num_hidden_layers):
        raise ValueError(f"{config.model_type} checkpoints cannot share layers (num_hidden_groups="
                         f"{config.num_hidden_groups}); only ALBERT's can")
    out["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    out["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    if config.model_type == "roberta":
        out.update(bos_token_id=0, eos_token_id=2)
    return out


def load_state_dict(local_dir) -> Dict[str, Tensor]:
    """The weights of a checkpoint directory: safetensors (single or sharded), else a torch file
    loaded with ``weights_only=True``."""
    d = Path(local_dir)
    if (d / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(d / "model.safetensors"))
    if (d / "model.safetensors.index.json").is_file():
        from safetensors.torch import load_file
        shards = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(load_file(str(d / shard)))
        return out
    if (d / "pytorch_model.bin").is_file():
        return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"local_dir {str(d)!r} has no model.safetensors, model.safetensors.index.json or "
                     f"pytorch_model.bin")


def from_pretrained(local_dir, model_class: Optional[Type[PreTrainedEncoder]] = None, strict: bool = True,
                    **config_overrides):
    """Load a local Hugging Face BERT / RoBERTa / ALBERT / ELECTRA checkpoint (no network).

    ``model_class`` defaults to the ``architectures`` entry of config.json (else the class the
    keys fit); ``config_overrides`` replace config fields (``backend="cpu"``, dropout, ...).
    """
    d = Path(local_dir)
    if not (d / "config.json").is_file():
        raise ValueError(f"local_dir must be a directory with a config.json, got {str(d)!r}")
    hf_config = json.loads((d / "config.json").read_text())
    config = config_from_hf(hf_config, **config_overrides)
    if model_class is None:
        arch = (hf_config.get("architectures") or [None])[0]
        model_class = MODEL_CLASSES.get(arch)
    elif not issubclass(model_class, PreTrainedEncoder):
        raise TypeError(f"model_class must be a pyattn.models encoder class, got {model_class!r}")
    if model_class is not None and not isinstance(config, model_class.config_class):
        raise ValueError(f"local_dir holds a {config.model_type} checkpoint; {model_class.__name__} needs "
                         f"{model_class.config_class.model_type}")
    return from_hf_state_dict(load_state_dict(d), config, model_class, strict=strict)


def to_hf_state_dict(model: PreTrainedEncoder) -> Dict[str, Tensor]:
    """The model's weights under Hugging Face names (contiguous copies, tied decoder included)."""
    family = model.config.model_type
    is_head_model = hasattr(model, "model")
    prefix = BASE_MODEL[family].__name__.replace("Model", "").lower() + "."
    out: Dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        names, base = hf_names(key, family)
        parts = value.chunk(len(names)) if len(names) > 1 else (value,)
        for name, part in zip(names, parts):
            out[(prefix if base and is_head_model else "") + name] = part.detach().clone().contiguous()
    if hasattr(model, "mlm"):
        dec = _tied_decoder_keys(family)
        out[dec[0]] = model.mlm.decoder_weight.detach().clone().contiguous()
        if len(dec) > 1:
            out[dec[1]] = model.mlm.bias.detach().clone().contiguous()
    return out


def save_pretrained(model: PreTrainedEncoder, local_dir) -> None:
    """Write ``config.json`` and ``model.safetensors`` that transformers loads back."""
    from safetensors.torch import save_file
    d = Path(local_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config_to_hf(model.config, model.hf_architecture), indent=2))
    save_file(to_hf_state_dict(model), str(d / "model.safetensors"), metadata={"format": "pt"})


__all__ = ["from_pretrained", "from_hf_state_dict", "save_pretrained", "to_hf_state_dict", "config_from_hf",
           "config_to_hf", "load_state_dict", "infer_model_class", "hf_names"]
