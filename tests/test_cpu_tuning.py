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
    # final on a quiet machine, provisional (the built-in default) on a busy one
    assert entry["source"].startswith("measured") and entry["path"] in tuning.available_paths()
    assert entry["provisional"] == (not entry["trusted"]) and entry["bwd_path"] in tuning.available_paths()
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
    assert again["source"].startswith("measured") and again["key"].startswith("Another CPU")
    data = json.loads(Path(os.environ["PYATTN_CPU_TUNING_CACHE"]).read_text())
    assert entry["key"] in data and again["key"] in data


def test_cache_survives_a_restart(tuning, tmp_path):
    # a quiet machine caches the first measurement as final; a busy one (the load of other jobs)
    # caches provisional entries that the next processes measure again, at most MAX_ATTEMPTS times
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYATTN_CPU_TUNING_CACHE=str(tmp_path / "restart.json"))
    env.pop("PYATTN_CPU_AUTOTUNE", None)
    env.pop("PYATTN_CPU_ATTN_PATH", None)
    code = ("import torch, pyattn; from pyattn.ops import cpu_tuning; "
            "print(cpu_tuning.ensure(torch.float32, 64)['source'])")
    sources = []
    for _ in range(tuning.MAX_ATTEMPTS + 1):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        sources.append(r.stdout.strip())
        assert ("cpu attention tiles" in r.stderr) == sources[-1].startswith("measured")
        if sources[-1].startswith("cache"):
            break
    final = sources.index("measured")
    assert sources[:final] == ["measured (provisional)"] * final and final < tuning.MAX_ATTEMPTS
    assert sources[final + 1].startswith("cache")


def _fake_machine(monkeypatch, tuning, load, fwd, bwd, jitter=lambda i: 1.0):
    """Replaces the timed runs with fake times (by path) and the load
    average with `load`; returns the list of policies handed to the C++ side."""
    count = iter(range(10 ** 6))
    monkeypatch.setattr(tuning, "_machine_load", lambda: load)
    monkeypatch.setattr(tuning, "available_paths", lambda: ["sgemm", "brgemm_f32"])
    monkeypatch.setattr(tuning, "_backward_inputs", lambda dtype, D, inputs: inputs)
    # other block sizes than the default: 5% slower
    monkeypatch.setattr(tuning, "_run_forward", lambda dtype, D, path, blocks, inputs: fwd[path] * jitter(next(count))
                        * (1.0 if tuple(blocks) == tuning.DEFAULT_BLOCKS else 1.05))
    monkeypatch.setattr(tuning, "_run_backward", lambda dtype, D, path, blocks, inputs: bwd[path] * jitter(next(count)))
    applied = []
    monkeypatch.setattr(tuning, "_set", lambda dtype, D, path, bq, bk, bwd_path=None: applied.append(
        (path, bq, bk, bwd_path)))
    monkeypatch.delenv("PYATTN_CPU_AUTOTUNE", raising=False)
    monkeypatch.delenv("PYATTN_CPU_ATTN_PATH", raising=False)
    return applied


FAST_SGEMM = dict(fwd={"sgemm": 1.0, "brgemm_f32": 1.5}, bwd={"sgemm": 2.0, "brgemm_f32": 3.0})


def _cached(key):
    return json.loads(Path(os.environ["PYATTN_CPU_TUNING_CACHE"]).read_text())[key]


def test_quiet_measurement_is_final(tuning, monkeypatch):
    applied = _fake_machine(monkeypatch, tuning, 0.0, **FAST_SGEMM, jitter=lambda i: 1.0 + 0.01 * (i % 3))
    entry = tuning.ensure(torch.float32, 64)
    assert entry["source"] == "measured" and entry["trusted"] and not entry["provisional"]
    assert (entry["path"], entry["bwd_path"]) == ("sgemm", "sgemm")  # 1/3 faster than the default brgemm_f32
    assert applied[-1] == ("sgemm", 256, 512, "sgemm")
    assert entry["spread"] < tuning.SPREAD_LIMIT and entry["load_per_core"] == 0.0
    assert not _cached(entry["key"])["provisional"]
    info = pyattn.cpu_tuning()["choices"]["float32 D<=64"]
    assert info["load_per_core"] == 0.0 and info["spread"] == entry["spread"] and info["bwd_path"] == "sgemm"
    tuning.reset()
    assert tuning.ensure(torch.float32, 64)["source"].startswith("cache")


def test_small_gain_keeps_the_default(tuning, monkeypatch):
    _fake_machine(monkeypatch, tuning, 0.0, fwd={"sgemm": 0.95, "brgemm_f32": 1.0},
                  bwd={"sgemm": 1.0, "brgemm_f32": 0.5})
    entry = tuning.ensure(torch.float32, 64)
    assert (entry["path"], entry["bwd_path"]) == ("brgemm_f32", "brgemm_f32") and entry["trusted"]


def test_ratios_are_per_round(tuning):
    # every second round is twice as slow for all candidates (another process comes and goes):
    # the per-round ratios still see sgemm 1/3 faster, and the spread shows the noise
    slow = [1.0, 2.0, 1.0, 2.0, 1.0]
    a, b = ("brgemm_f32", (256, 512)), ("sgemm", (256, 512))
    times = {a: [1.5 * f for f in slow], b: [1.0 * f for f in slow]}
    ratios, spread = tuning._compare(times, a)
    assert ratios[b] == pytest.approx(2 / 3) and ratios[a] == 1.0
    assert spread > tuning.SPREAD_LIMIT
    assert tuning._pick(ratios, a) == b
    # a minimum over rounds would be fooled by one lucky round of the slower candidate; the median is not
    times = {a: [1.5, 1.5, 0.9, 1.5, 1.5], b: [1.0] * 5}
    assert tuning._pick(tuning._compare(times, a)[0], a) == b


@pytest.mark.parametrize("noise", ["load", "spread"])
def test_noisy_measurement_is_provisional(tuning, monkeypatch, noise):
    load = 1.5 if noise == "load" else 0.0
    jitter = (lambda i: 1.0) if noise == "load" else (lambda i: 1.0 + 0.9 * (i % 4 == 0))
    applied = _fake_machine(monkeypatch, tuning, load, **FAST_SGEMM, jitter=jitter)
    for attempt in range(1, tuning.MAX_ATTEMPTS + 1):
        tuning.reset()
        entry = tuning.ensure(torch.float32, 64)
        assert entry["source"].startswith("measured") and not entry["trusted"] and entry["attempts"] == attempt
        # the busy machine's winner is not used (a machine busy before the start is not even timed):
        # the built-in default runs
        assert (entry["path"], entry["bwd_path"]) == ("brgemm_f32", "brgemm_f32")
        if noise == "load":
            assert entry["skipped"] == "machine busy" and entry["timings_ms"] == {}
        else:
            assert entry["measured_path"] in ("sgemm", "brgemm_f32") and entry["timings_ms"]  # recorded, not used
        assert applied[-1] == ("brgemm_f32", 256, 512, "brgemm_f32")
        cached = _cached(entry["key"])
        assert cached["provisional"] == (attempt < tuning.MAX_ATTEMPTS)
        assert cached["load_per_core"] == load
        assert (cached["spread"] is None) if noise == "load" else (cached["spread"] > tuning.SPREAD_LIMIT)
    tuning.reset()  # after MAX_ATTEMPTS the default is final: no more measurements
    assert tuning.ensure(torch.float32, 64)["source"].startswith("cache")


def test_machine_load_is_other_processes_per_core(tuning, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 2.0, 1.0))
    monkeypatch.setattr(tuning, "_own_cpu_rate", lambda: 2.0)  # this process kept both cores busy
    assert tuning._machine_load() == pytest.approx(0.5)
    monkeypatch.setattr(tuning, "_own_cpu_rate", lambda: 0.1)  # idle: still its one running thread
    assert tuning._machine_load() == pytest.approx(1.0)
    assert 0.0 <= tuning._own_cpu_rate() <= (os.cpu_count() or 1) * 2


def test_load_rising_during_the_measurement_is_untrusted(tuning, monkeypatch):
    _fake_machine(monkeypatch, tuning, 0.0, **FAST_SGEMM)
    loads = iter([0.0, 1.0])  # quiet at the start, busy at the end
    monkeypatch.setattr(tuning, "_machine_load", lambda: next(loads))
    entry = tuning.ensure(torch.float32, 64)
    assert entry["provisional"] and entry["load_per_core"] == 1.0 and entry["path"] == "brgemm_f32"
    assert entry["spread"] < tuning.SPREAD_LIMIT and entry["measured_path"] == "sgemm"


def test_provisional_entry_is_measured_again_and_overrides_win(tuning, monkeypatch):
    applied = _fake_machine(monkeypatch, tuning, 2.0, **FAST_SGEMM)
    key = tuning.ensure(torch.float32, 64)["key"]
    assert _cached(key)["provisional"]
    monkeypatch.setattr(tuning, "_machine_load", lambda: 0.0)  # the machine is quiet now
    tuning.reset()
    entry = tuning.ensure(torch.float32, 64)
    assert entry["source"] == "measured" and entry["attempts"] == 2 and entry["path"] == "sgemm"
    assert not _cached(key)["provisional"]
    # the environment wins over a measured or provisional entry
    monkeypatch.setenv("PYATTN_CPU_ATTN_PATH", "brgemm_f32")
    monkeypatch.setenv("PYATTN_CPU_ATTN_BLOCK_Q", "64")
    tuning.reset()
    entry = tuning.ensure(torch.float32, 64)
    assert (entry["path"], entry["bwd_path"], entry["block_q"]) == ("brgemm_f32", "brgemm_f32", 64)
    assert applied[-1] == ("brgemm_f32", 64, 512, "brgemm_f32")
    monkeypatch.setenv("PYATTN_CPU_AUTOTUNE", "0")
    monkeypatch.setattr(tuning, "_run_forward", lambda *a: pytest.fail("measured with PYATTN_CPU_AUTOTUNE=0"))
    tuning.reset()
    assert tuning.ensure(torch.float32, 128)["source"].startswith("default")


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
