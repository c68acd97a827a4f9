"""The training loop: global batches, gradient accumulation, periodic eval, logging, checkpoints.

A step's global batch has ``batch_size * world_size * grad_accum`` rows, drawn by every rank
from the same data generator; micro-batch ``m`` of rank ``r`` is its block of ``batch_size``
rows. Each rank back-propagates ``sum of its token losses / tokens of the global batch *
world_size``; DDP / FSDP average the gradients over the ranks, so every configuration
(1 process with a doubled batch, 2 processes, accumulation) optimises the same global mean loss.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import List

import torch

from . import distributed, state
from .corpus import Corpus, clm_batch, mlm_batch
from .tasks import build_model, layer_list, loss_sum


def make_batch(args, data, rows: int, gen: torch.Generator):
    if args.task == "mlm":
        return mlm_batch(data, rows, args.seq_len, gen, args.mask_prob)
    return clm_batch(data, rows, args.seq_len, gen)


def lr_lambda(args):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``steps``."""
    def f(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(args.steps - args.warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def _autocast(args, d):
    if not args.bf16:
        return contextlib.nullcontext()
    return torch.autocast(d.device.type, dtype=torch.bfloat16)


def evaluate(model, args, corpus: Corpus, d) -> float:
    """Mean token loss on ``eval_batches`` fixed global batches of the held-out split."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows = args.batch_size * d.world_size
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(args.eval_batches):
            inputs, labels = make_batch(args, corpus.val, rows, gen)
            sl = slice(d.rank * args.batch_size, (d.rank + 1) * args.batch_size)
            with _autocast(args, d):
                s, n = loss_sum(model, inputs[sl].to(d.device), labels[sl].to(d.device))
            total += torch.tensor([s.item(), n], dtype=torch.float64)
    model.train()
    total = distributed.all_sum(total, d)
    return float(total[0] / total[1].clamp(min=1))


def write_log(out: Path, history: List[dict]) -> None:
    with open(out / "log.jsonl", "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")


def plot(out: Path, history: List[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in history if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def train(args) -> List[dict]:
    """Run the training of ``args`` (see :mod:`.cli`); returns the log records."""
    from tqdm import tqdm

    d = distributed.setup(args.device)
    try:
        torch.manual_seed(args.seed)  # same initial weights on every rank
        corpus = Corpus.load(args.corpus, args.val_fraction)
        model = build_model(args).to(d.device)
        if hasattr(model, "layout"):  # build the block layout outside any compiled region
            model.layout(args.seq_len, d.device)
        n_params = sum(p.numel() for p in model.parameters())
        if args.fsdp and not d.enabled:
            raise ValueError("--fsdp needs a process group: launch with torchrun")
        model = distributed.wrap(model, d, args.fsdp, layer_list(model))
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
        data_gen = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed + 1000 + d.rank)  # dropout streams differ per rank
        out = Path(args.out)
        ckpt = out / "checkpoint"
        step, history = 0, []
        if args.resume:
            path = ckpt if args.resume == "auto" else Path(args.resume)
            st = state.load(path, model, opt, sched, data_gen, d, args.fsdp)
            step, history = st["step"], st["history"]
        fwd = torch.compile(model) if args.compile else model
        stop = min(args.steps, args.stop_at) if args.stop_at else args.steps
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            mode = "fsdp2" if args.fsdp else ("ddp" if d.enabled else "single process")
            print(f"pyattn.train: task={args.task} model={args.model if args.task == 'clm' else 'bert'} "
                  f"params={n_params:,} {mode} x{d.world_size} on {d.device}; corpus: {corpus.description}",
                  flush=True)
        rows = args.batch_size * d.world_size * args.grad_accum
        tokens_per_step = rows * args.seq_len
        bar = tqdm(total=stop, initial=step, disable=not d.main or args.no_progress, dynamic_ncols=True)
        t_last = time.perf_counter()
        while step < stop:
            inputs, labels = make_batch(args, corpus.train, rows, data_gen)
            count = int((labels != -100).sum())
            step_loss = torch.zeros((), dtype=torch.float64)
            for m in range(args.grad_accum):
                first = (m * d.world_size + d.rank) * args.batch_size
                sl = slice(first, first + args.batch_size)
                with distributed.no_sync(model, m == args.grad_accum - 1):
                    with _autocast(args, d):
                        s, _ = loss_sum(fwd, inputs[sl].to(d.device), labels[sl].to(d.device))
                    (s * (d.world_size / max(count, 1))).backward()
                step_loss += s.detach().double().cpu() / max(count, 1)
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss = float(distributed.all_sum(step_loss, d))
            now = time.perf_counter()
            tok_s = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            rec = {"step": step, "loss": loss, "lr": sched.get_last_lr()[0], "tokens_per_s": round(tok_s, 1)}
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                rec["eval_loss"] = evaluate(fwd, args, corpus, d)
                t_last = time.perf_counter()
            history.append(rec)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}",
                            **({"eval": f"{rec['eval_loss']:.4f}"} if "eval_loss" in rec else {}))
            bar.update(1)
            if (args.save_every and step % args.save_every == 0) or step == stop:
                state.save(ckpt, model, opt, sched, data_gen, step, history, vars(args), d, args.fsdp)
                t_last = time.perf_counter()
                if d.main:
                    write_log(out, history)
        bar.close()
        if d.main:
            write_log(out, history)
            if not args.no_plot:
                plot(out, history, f"{args.task} {args.model if args.task == 'clm' else 'bert'}, "
                                   f"{n_params:,} params, x{d.world_size}")
            last = [r for r in history if "eval_loss" in r]
            print(f"pyattn.train: step {step}: loss {history[-1]['loss']:.4f}"
                  + (f", eval loss {last[-1]['eval_loss']:.4f}" if last else "") + f"; wrote {out}", flush=True)
        return history
    finally:
        distributed.teardown()
