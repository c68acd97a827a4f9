"""The benchmark suite through pytest-benchmark: the same cases as ``python -m pyattn.bench``.

    python -m pytest benchmarks/ --benchmark-only [--bench-device cuda] [--bench-full] -k rms_norm
"""
import pytest
import torch

from pyattn.bench import cases as bench_cases
from pyattn.bench.__main__ import _load_suites

_load_suites()


def _device(config):
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    device = _device(metafunc.config)
    quick = not metafunc.config.getoption("--bench-full")
    params, ids = [], []
    for family, build in bench_cases.SUITES.items():
        for case in build(device, quick):
            for impl in case.impls:
                params.append((case, impl))
                ids.append(f"{family}-{case.mode}-{case.config}-{case.dtype}-{impl}".replace(" ", "_"))
    metafunc.parametrize("bench_case", params, ids=ids)


def test_bench(benchmark, bench_case):
    case, impl = bench_case
    fn = case.impls[impl]
    benchmark.group = f"{case.op} {case.mode} {case.config} {case.dtype}"
    benchmark.extra_info.update(work=case.work, unit=case.unit)
    if torch.cuda.is_available():
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(fn)
