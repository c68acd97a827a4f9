"""Checkpoints: a folder with ``model.safetensors`` (the full, unsharded weights: loadable without
pyattn.train) and ``state.pt`` (``torch.save``: optimizer, scheduler, the data generator, every
rank's RNG state, the step, the log so far and the arguments)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as dist
from torch import nn

from .distributed import Dist

MODEL_FILE, STATE_FILE = "model.safetensors", "state.pt"


def _full_state(model: nn.Module, opt, fsdp: bool):
    """(model state dict, optimizer state dict), both unsharded, on CPU. Collective under FSDP."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o)
    inner = getattr(model, "module", model)  # DDP
    return inner.state_dict(), opt.state_dict()


def _rng_state(d: Dist) -> Dict[str, Any]:
    s = {"cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(d.device)
    return s


def save(path: Path, model: nn.Module, opt, sched, data_gen: torch.Generator, step: int, history: list,
         args: dict, d: Dist, fsdp: bool) -> None:
    """Write the checkpoint (rank 0 writes; every rank must call this)."""
    from safetensors.torch import save_file

    weights, opt_state = _full_state(model, opt, fsdp)
    rngs = [None] * d.world_size
    if d.enabled:
        dist.all_gather_object(rngs, _rng_state(d))
    else:
        rngs = [_rng_state(d)]
    if d.main:
        path.mkdir(parents=True, exist_ok=True)
        # tied weights appear under two names: separate copies (safetensors refuses shared storage)
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, str(path / MODEL_FILE))
        torch.save({"optimizer": opt_state, "scheduler": sched.state_dict(), "data_generator": data_gen.get_state(),
                    "rng": rngs, "step": step, "history": history, "args": args}, path / STATE_FILE)
    if d.enabled:
        dist.barrier()


def load(path: Path, model: nn.Module, opt, sched, data_gen: torch.Generator, d: Dist, fsdp: bool) -> dict:
    """Restore everything ``save`` wrote into the (wrapped) model and the trainer objects; returns
    the state dict (``step``, ``history``, ``args``)."""
    from safetensors.torch import load_file

    if not (path / MODEL_FILE).is_file() or not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume: {path} does not hold {MODEL_FILE} and {STATE_FILE}")
    weights = load_file(str(path / MODEL_FILE))
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        o = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=o)
        set_optimizer_state_dict(model, opt, state["optimizer"], options=o)
    else:
        getattr(model, "module", model).load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    data_gen.set_state(state["data_generator"])
    rngs = state["rng"]
    if len(rngs) != d.world_size:
        raise ValueError(f"--resume: the checkpoint was written by {len(rngs)} processes, this run has "
                         f"{d.world_size}; resume with the same number of processes")
    torch.set_rng_state(rngs[d.rank]["cpu"])
    if "cuda" in rngs[d.rank] and d.device.type == "cuda":
        torch.cuda.set_rng_state(rngs[d.rank]["cuda"], d.device)
    return state
