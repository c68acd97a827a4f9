"""Static checks of the CUDA decode kernels (no GPU needed): csrc/cuda/decode.cu compiles with nvcc for
sm_80 and sm_90a without warnings or register spills, against the launcher declarations of the decode
block of csrc/cuda_binding.cpp (force-included, so a signature drift is a compile error); the binding
itself is syntax-checked by tests/test_cuda_compile.py."""
import re

import pytest

import test_cuda_compile as cc

pytestmark = pytest.mark.skipif(cc.NVCC is None, reason="nvcc is not on PATH")
MARKER = "KV-cache decoding attention (csrc/cuda/decode.cu)"


def _decode_header(tmp):
    text = cc.BINDING.read_text()
    block = text[text.index(MARKER):]
    start = block.index('extern "C" {')
    end = block.index("\n}", start)
    header = tmp / "pyattn_decode_launchers.h"
    header.write_text("#pragma once\n#include <cuda_runtime.h>\n#include <stdint.h>\n" + block[start:end + 2] + "\n")
    return header


@pytest.mark.parametrize("arch", list(cc.ARCHS))
def test_decode_cu_compiles_without_spills(tmp_path, arch):
    rc, log, cmd = cc._nvcc_job(cc.CUDA_DIR / "decode.cu", arch, tmp_path, _decode_header(tmp_path))
    assert rc == 0, f"nvcc failed ({cmd}):\n{log[-6000:]}"
    warnings = [ln for ln in log.splitlines() if re.search(r"\bwarning\b", ln, re.IGNORECASE)]
    assert not warnings, "nvcc warnings:\n" + "\n".join(warnings[:40])
    kernels = cc._parse_ptxas(log)
    names = " ".join(k for k, _, _ in kernels)
    for kernel in ("decode_split_kernel", "decode_combine_kernel", "decode_append_kernel"):
        assert kernel in names, f"{kernel} missing from the ptxas output"
    for kname, _, info in kernels:
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, f"{kname} ({arch}) spills: {info}"
        assert info["smem"] <= cc.SMEM_STATIC_LIMIT, f"{kname} ({arch}) static smem {info['smem']} B"
