"""PYATTN_EXTRA_CFLAGS / PYATTN_EXTRA_LDFLAGS reach the C++ build flags (scripts/sanitize.sh uses them)."""
from pyattn import _build


def test_extra_flags_from_the_environment(monkeypatch):
    base_c, base_ld = _build.cpu_cflags("AVX2"), _build.cpu_ldflags()
    monkeypatch.setenv("PYATTN_EXTRA_CFLAGS", "-fsanitize=address,undefined  -fno-omit-frame-pointer")
    monkeypatch.setenv("PYATTN_EXTRA_LDFLAGS", "-fsanitize=address,undefined")
    assert _build.cpu_cflags("AVX2") == base_c + ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    assert _build.cpu_ldflags() == base_ld + ["-fsanitize=address,undefined"]
    monkeypatch.delenv("PYATTN_EXTRA_CFLAGS")
    monkeypatch.delenv("PYATTN_EXTRA_LDFLAGS")
    assert _build.cpu_cflags("AVX2") == base_c and _build.cpu_ldflags() == base_ld
