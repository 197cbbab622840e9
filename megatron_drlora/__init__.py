"""megatron-drlora: DR-LoRA (Dynamic Rank LoRA) for Megatron-Core Mixture-of-Experts models."""

from megatron_drlora.compat.megatron import prepare_import

prepare_import()  # Python 3.11 shim and CPU triton stub, before anything imports megatron

from megatron_drlora.config import DRLoRAConfig, DRLoRAConfigError, add_drlora_args  # noqa: E402

__version__ = "0.1.0"

__all__ = ["DRLoRAConfig", "DRLoRAConfigError", "add_drlora_args", "__version__"]
