"""DR-LoRA as a plugin of Megatron-LM's own training loop (`megatron.training.pretrain`).

It enters only through Megatron-LM's extension points:
- `arguments.add_arguments` is the `extra_args_provider` (the `--drlora-*` flags);
- `model_provider.model_provider` builds the GPT model from Megatron's args, loads the frozen
  base from `--pretrained-checkpoint` and applies DR-LoRA;
- `run.DRLoRARun` installs `config.finalize_model_grads_func` (Megatron's finalize, then the
  DR-LoRA statistics) and follows the optimizer's step to grow ranks;
- `checkpoint_view` makes the model's sharded state dict hold what trains (adapters, a trained
  router) plus the DR-LoRA state, so Megatron-LM's own checkpointing saves and resumes it.

Needs megatron-core >= 0.17 (it ships `megatron/training`) or a Megatron-LM checkout.
"""
