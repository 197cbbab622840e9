"""Hugging Face interop: import HF MoE bases into Megatron-Core checkpoints and export DR-LoRA
results as merged HF checkpoints or PEFT adapters.

- `families`: which HF architectures are supported, the Megatron flags each implies, and the
  features that are refused (with the config key named).
- `checkpoint_io`: lazy safetensors reading and incremental shard writing.
- `mapping`: the tensor mapping between Megatron's global checkpoint keys and HF names.
- `importer`: HF -> Megatron base checkpoint + model args file (tools/convert_hf_to_megatron.py).
- `megatron_reader`: layer-by-layer reads from dist checkpoints (no model is built).
- `exporter` (tools/export_to_hf.py) with `export_merged`, `export_peft` and `model_card`
  (the export's README.md); writes staged in a hidden directory and renamed when complete.
- `verify`: logits of the HF model vs the Megatron model (`--verify`, tests).

Needs the `hf` extra (transformers, peft, safetensors) only where HF objects are touched.
"""

from megatron_drlora.hf.common import HFInteropError

__all__ = ["HFInteropError"]
