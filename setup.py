"""pyattn: attention, RMSNorm and GLU kernels for PyTorch (Triton, CUDA, C++ CPU).

The C++ and CUDA sources ship as package data and are compiled on first use against the
torch that is installed (no ABI mismatch); see pyattn/_build.py.
"""
import re
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
readme = (here / "README.md").read_text() if (here / "README.md").exists() else ""
# the version lives in one place: pyattn/_version.py
version = re.search(r'__version__ = "([^"]+)"', (here / "pyattn" / "_version.py").read_text()).group(1)

# Tested ranges (.ci/run): the pinned torch 2.13.0 / triton 3.6.0 and the newest that pip resolves
# (torch 2.14.1 / triton 3.8.0 at the time of writing). An installed torch inside the range is kept.
TORCH = "torch>=2.13,<2.15"
TRITON = "triton>=3.6,<3.9; platform_system == 'Linux'"

setup(
    name="pyattn",
    version=version,
    description="Fused attention (dense, masked, varlen, block-sparse, LSH), RMSNorm and GLU kernels for PyTorch",
    long_description=readme,
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["pyattn", "pyattn.ops", "pyattn.reference", "pyattn.nn", "pyattn.bench", "pyattn.integrations",
              "pyattn.models", "pyattn.train", "pyattn.tools", "pyattn.kernels", "pyattn._csrc"],
    package_dir={"pyattn.kernels": "kernels", "pyattn._csrc": "csrc"},
    package_data={"pyattn._csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h"]},
    install_requires=[TORCH, "numpy", "ninja"],
    extras_require={
        "triton": [TRITON],
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "numpy<2.4", TRITON, "transformers>=4.53", "matplotlib", "tqdm",
                 "safetensors"],
        "bench": ["matplotlib", "numpy<2.4", "tqdm", TRITON],
        "hf": ["transformers>=4.53"],
    },
    entry_points={"console_scripts": ["pyattn-bench=pyattn.bench.__main__:main"]},
)
