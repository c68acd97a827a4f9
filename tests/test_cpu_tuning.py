"""The cpu attention tile policy: every path is correct, the measured choice is cached and keyed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyattn
from helpers import skip_unless_backend
from attention_cases import check_attention, make_inputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    skip_unless_backend("cpu")
    from pyattn import _build
    if _build.load_cpu_extension("attention") is not None:
        pytest.skip("cpu attention extension unavailable")
    from pyattn.ops import cpu_tuning
    monkeypatch.setenv("PYATTN_CPU_TUNING_CACHE", str(tmp_path / "tuning.json"))
    cpu_tuning.reset()
    yield cpu_tuning
    cpu_tuning.reset()


@pytest.mark.parametrize("D", [40, 128])  # one of each head-dim class
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_every_tile_path_within_tolerance(tuning, monkeypatch, dtype, D):
    monkeypatch.setenv("PYATTN_CPU_AUTOTUNE", "0")
    paths = [p for p in tuning.available_paths() if p != "brgemm_bf16" or dtype == torch.bfloat16]
    q, k, v = make_inputs(B=1, H=2, Nq=200, Nk=230, D=D, dtype=dtype)  # >= 128 query rows: brgemm applies
    for path, blocks in [(p, (0, 0)) for p in paths] + [(paths[-1], (64, 128))]:
        monkeypatch.setenv("PYATTN_CPU_ATTN_PATH", path)
        monkeypatch.setenv("PYATTN_CPU_ATTN_BLOCK_Q", str(blocks[0] or 256))
        monkeypatch.setenv("PYATTN_CPU_ATTN_BLOCK_K", str(blocks[1] or 512))
        tuning.reset()
        check_attention("cpu", q, k, v, grad=dtype != torch.float16)
        check_attention("cpu", q, k, v, causal=True, grad=False)
        assert tuning.ensure(dtype, D)["path"] == path


def test_measured_choice_is_cached_and_reported(tuning, monkeypatch):
    monkeypatch.delenv("PYATTN_CPU_AUTOTUNE", raising=False)
    monkeypatch.delenv("PYATTN_CPU_ATTN_PATH", raising=False)
    entry = tuning.ensure(torch.float32, 64)
    assert entry["source"] == "measured" and entry["path"] in tuning.available_paths()
    assert entry["tune_seconds"] < 15  # about a second on an idle 2-core machine
    data = json.loads(Path(os.environ["PYATTN_CPU_TUNING_CACHE"]).read_text())
    assert data[entry["key"]]["path"] == entry["path"]
    info = pyattn.cpu_tuning()
    assert info["choices"]["float32 D<=64"]["path"] == entry["path"]
    assert info["blas"] and info["cpu"] and info["isa"]
    # a new key (another CPU model or torch version) measures again, next to the old entry
    monkeypatch.setattr(tuning, "cache_key", lambda dtype, dclass: "Another CPU|AVX2|float32|D<=64|threads2|torch9")
    tuning.reset()
    again = tuning.ensure(torch.float32, 64)
    assert again["source"] == "measured" and again["key"].startswith("Another CPU")
    data = json.loads(Path(os.environ["PYATTN_CPU_TUNING_CACHE"]).read_text())
    assert entry["key"] in data and again["key"] in data


def test_cache_survives_a_restart(tuning, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYATTN_CPU_TUNING_CACHE=str(tmp_path / "restart.json"))
    env.pop("PYATTN_CPU_AUTOTUNE", None)
    env.pop("PYATTN_CPU_ATTN_PATH", None)
    code = ("import torch, pyattn; from pyattn.ops import cpu_tuning; "
            "print(cpu_tuning.ensure(torch.float32, 64)['source'])")
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stdout.strip() == "measured"
    assert runs[1].stdout.strip().startswith("cache")
    assert "cpu attention tiles" in runs[0].stderr and "cpu attention tiles" not in runs[1].stderr


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_forced_path_the_cpu_lacks_is_rejected(tuning, monkeypatch):
    monkeypatch.setenv("PYATTN_CPU_AUTOTUNE", "0")
    q, k, v = make_inputs(B=1, H=2, Nq=200, D=64)
    monkeypatch.setenv("PYATTN_CPU_ATTN_PATH", "amx_tiles")
    with pytest.raises(ValueError, match="PYATTN_CPU_ATTN_PATH must be one of"):
        pyattn.attention(q, k, v, backend="cpu")
    tuning.reset()
    monkeypatch.setenv("PYATTN_CPU_ATTN_PATH", "brgemm_f32")
    with torch.backends.mkldnn.flags(enabled=False):  # oneDNN off: only sgemm is left
        with pytest.raises(ValueError, match="cannot run that tile path"):
            pyattn.attention(q, k, v, backend="cpu")
    tuning.reset()
    monkeypatch.setenv("PYATTN_CPU_ATTN_PATH", "sgemm")
    monkeypatch.setenv("PYATTN_CPU_ATTN_BLOCK_Q", "-3")
    with pytest.raises(ValueError, match="PYATTN_CPU_ATTN_BLOCK_Q must be a positive int"):
        pyattn.attention(q, k, v, backend="cpu")


def test_autotune_can_be_skipped(tuning, monkeypatch):
    monkeypatch.setenv("PYATTN_CPU_AUTOTUNE", "0")
    monkeypatch.delenv("PYATTN_CPU_ATTN_PATH", raising=False)
    entry = tuning.ensure(torch.bfloat16, 128)
    assert entry["source"].startswith("default") and entry["path"] is None
    assert not Path(os.environ["PYATTN_CPU_TUNING_CACHE"]).exists()
