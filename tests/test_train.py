"""``python -m pyattn.train``: loss decreases on the corpus, outputs, exact resume, gradient
accumulation, and 2-process torchrun (DDP and FSDP2) equal to 1 process with the doubled batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("tqdm")

from pyattn.train import main, parse_args  # noqa: E402
from pyattn.train.corpus import MASK_ID, Corpus, mlm_batch, windows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden-size", "32", "--layers", "1", "--heads", "2", "--intermediate-size", "64", "--seq-len", "64",
        "--block", "16", "--no-progress", "--no-plot", "--eval-every", "0", "--warmup", "2"]


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    main([*TINY, "--out", str(out), *extra])
    return out


def _losses(out: Path, key="loss"):
    return [json.loads(line)[key] for line in (out / "log.jsonl").read_text().splitlines()
            if key in json.loads(line)]


def test_corpus_is_the_stdlib_source_and_mlm_masks():
    c = Corpus.load()
    assert "standard library" in c.description and len(c.train) > 500_000
    text = bytes(c.train[:20000].tolist()).decode("utf-8", errors="replace")
    assert "# ---- argparse ----" in text and "def " in text
    inputs, labels = mlm_batch(c.train, 8, 128, torch.Generator().manual_seed(0))
    frac = (labels != -100).float().mean().item()
    assert 0.1 < frac < 0.2
    predicted = labels != -100
    orig = windows(c.train, 8, 128, torch.Generator().manual_seed(0))  # the same draws come first
    assert torch.equal(inputs[~predicted], orig[~predicted]) and torch.equal(labels[predicted], orig[predicted])
    assert (inputs[predicted] == MASK_ID).float().mean() > 0.6


def test_sparse_transformer_loss_decreases_and_outputs_written(tmp_path):
    out = tmp_path / "st"
    main([*TINY[:-5], "--model", "sparse_transformer", "--steps", "25", "--eval-every", "25", "--warmup", "2",
          "--out", str(out)])
    losses = _losses(out)
    assert len(losses) == 25 and losses[-1] < losses[0] - 1.0, losses
    ev = _losses(out, "eval_loss")
    assert len(ev) == 1 and ev[0] < losses[0] - 1.0
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoint" / "model.safetensors").is_file() and (out / "checkpoint" / "state.pt").is_file()
    from safetensors.torch import load_file

    assert "embed_tokens.weight" in load_file(str(out / "checkpoint" / "model.safetensors"))


def test_mlm_bert_loss_decreases(tmp_path):
    out = _run(tmp_path, "mlm", "--task", "mlm", "--steps", "20", "--lr", "5e-3")
    losses = _losses(out)
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("task", [["--task", "clm", "--dropout", "0.1"], ["--task", "mlm"]], ids=["clm", "mlm"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, task):
    common = ["--steps", "8", "--save-every", "2", *task]
    full = _losses(_run(tmp_path, "full", *common))
    _run(tmp_path, "split", *common, "--stop-at", "4")
    assert len(_losses(tmp_path / "split")) == 4
    resumed = _losses(_run(tmp_path, "split", *common, "--resume"))
    assert len(full) == len(resumed) == 8
    assert resumed == full  # bit for bit: same weights, optimizer, schedule, data order and dropout RNG


def test_grad_accum_equals_the_doubled_batch(tmp_path):
    a = _losses(_run(tmp_path, "accum", "--steps", "4", "--batch-size", "2", "--grad-accum", "2"))
    b = _losses(_run(tmp_path, "big", "--steps", "4", "--batch-size", "4"))
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["sparse_transformer", "llama"])
def test_bf16_autocast_trains(tmp_path, model):
    losses = _losses(_run(tmp_path, "bf16", "--steps", "6", "--bf16", "--model", model))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_bad_arguments():
    with pytest.raises(SystemExit):
        parse_args(["--task", "seq2seq"])
    with pytest.raises(SystemExit):
        parse_args(["--steps", "4", "--stop-at", "5"])
    with pytest.raises(ValueError, match="--fsdp needs a process group"):
        main([*TINY, "--fsdp", "--steps", "1"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_equal_one_with_the_doubled_batch(tmp_path, mode):
    steps = ["--steps", "3", "--model", "sparse_transformer"]
    single = _losses(_run(tmp_path, "single", *steps, "--batch-size", "4"))
    out = tmp_path / mode
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "pyattn.train", *TINY, *steps, "--batch-size", "2", "--out", str(out)]
    if mode == "fsdp":
        cmd.append("--fsdp")
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x2" in proc.stdout
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(single), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compile_gives_the_eager_losses(tmp_path):
    args = ["--steps", "3", "--model", "sparse_transformer"]
    eager = _losses(_run(tmp_path, "eager", *args))
    compiled = _losses(_run(tmp_path, "compiled", *args, "--compile"))
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-4)
