"""pyattn: attention, RMSNorm and GLU kernels for PyTorch (Triton, CUDA, C++ CPU).

The C++ and CUDA sources ship as package data and are compiled on first use against the
torch that is installed (no ABI mismatch); see pyattn/_build.py.
"""
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
readme = (here / "README.md").read_text() if (here / "README.md").exists() else ""

setup(
    name="pyattn",
    version="0.1.0",
    description="Fused attention (dense, masked, varlen, block-sparse, LSH), RMSNorm and GLU kernels for PyTorch",
    long_description=readme,
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["pyattn", "pyattn.ops", "pyattn.reference", "pyattn.nn", "pyattn.bench", "pyattn.integrations",
              "pyattn.models", "pyattn.tools", "pyattn.kernels", "pyattn._csrc"],
    package_dir={"pyattn.kernels": "kernels", "pyattn._csrc": "csrc"},
    package_data={"pyattn._csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h"]},
    install_requires=["torch>=2.5", "numpy", "ninja"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "numpy<2.4", "triton>=3.2; platform_system == 'Linux'",
                 "transformers>=4.53"],
        "bench": ["matplotlib", "numpy<2.4", "triton>=3.2; platform_system == 'Linux'"],
        "hf": ["transformers>=4.53"],
    },
    entry_points={"console_scripts": ["pyattn-bench=pyattn.bench.__main__:main"]},
)
