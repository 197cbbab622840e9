"""The pieces `examples/pretrain_gpt.py` hands to `megatron.training.pretrain`, besides the
model provider: argument parsing (Megatron-LM's parser plus DR-LoRA's flags), batches, and the
GPT datasets (Megatron's GPTDataset, with the prompt loss mask of tools/preprocess_data.py).
"""

from __future__ import annotations

from typing import Dict

import torch


def parse_args():
    """Megatron-LM's args with DR-LoRA's flags; returns the config container `pretrain` takes.

    The CPU/gloo workarounds are enabled here (no-ops with CUDA), the DR-LoRA flags checked
    before any process group exists, and the run the providers use is started.
    """
    import megatron.core  # noqa: F401
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_drlora.compat import cpu
    from megatron_drlora.compat.megatron import (save_with_an_empty_optimizer_group,
                                                 use_prebuilt_dataset_helpers)
    from megatron_drlora.megatron_lm.arguments import add_arguments, validate_or_exit
    from megatron_drlora.megatron_lm.run import start_run

    cpu.enable_training_loop_cpu_support()
    use_prebuilt_dataset_helpers()
    save_with_an_empty_optimizer_group()
    # Megatron-LM 0.19's train loop divides by --eval-interval even when it is not given;
    # 1000 was its documented default before.
    args = parse_and_validate_args(extra_args_provider=add_arguments,
                                   args_defaults={"eval_interval": 1000})
    start_run(validate_or_exit(args))
    import warnings

    with warnings.catch_warnings():  # "use a ModelConfig instead of a model provider"
        warnings.simplefilter("ignore")
        return pretrain_cfg_container_from_args(args)


def get_batch(data_iterator) -> Dict[str, torch.Tensor]:
    """This rank's micro-batch on the training device, split over context parallelism."""
    from megatron.core import parallel_state as mpu
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
    if mpu.get_context_parallel_world_size() > 1:
        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False,
                                          cp_group=mpu.get_context_parallel_group())
    return batch


def drlora_loss_report(device) -> Dict[str, torch.Tensor]:
    """DR-LoRA's figures for the loss dict, on `device` (empty without DR-LoRA)."""
    from megatron_drlora.megatron_lm.run import current_run

    run = current_run()
    return run.loss_report(device) if run is not None and run.handle is not None else {}


def gpt_datasets(train_val_test_num_samples):
    """(train, valid, test) datasets from Megatron's data flags (`--data-path` blends and
    `--split`, per-split paths, or `--mock-data`)."""
    import dataclasses

    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    from megatron_drlora.data.dataset import LossMaskedGPTDataset, check_tokenizer_matches

    args = get_args()
    tokenizer = get_tokenizer()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    if not args.mock_data:
        prefixes = list(blend[0]) if blend else [p for split in blend_per_split or [] if split
                                                 for p in split[0]]
        for prefix in prefixes:
            check_tokenizer_matches(prefix, _TokenizerIdentity(tokenizer, args))
    values = dict(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
        blend_per_split=blend_per_split, split=args.split,
        multiple_validation_sets=getattr(args, "multiple_validation_sets", False),
        full_validation=getattr(args, "full_validation", False),
        path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer, reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=getattr(args, "mid_level_dataset_surplus", 0.005),
        allow_ambiguous_pad_tokens=getattr(args, "allow_ambiguous_pad_tokens", False),
    )
    known = {f.name for f in dataclasses.fields(GPTDatasetConfig)}
    config = GPTDatasetConfig(**{k: v for k, v in values.items() if k in known})
    dataset_type = MockGPTDataset if args.mock_data else LossMaskedGPTDataset
    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples,
                                         lambda: True, config).build()


class _TokenizerIdentity:
    """What check_tokenizer_matches reads, from Megatron's tokenizer and its model file.

    NullTokenizer (`ids_only`): its vocabulary and eod come from the flags when no tokenizer
    object is at hand, and the data's eod matters only where the run uses it."""

    def __init__(self, tokenizer, args):
        self.ids_only = args.tokenizer_type == "NullTokenizer"
        self.eod_used = any(getattr(args, flag, False) for flag in (
            "eod_mask_loss", "reset_position_ids", "reset_attention_mask"))
        if tokenizer is None and self.ids_only and args.vocab_size:
            self.vocab_size = int(args.vocab_size)
            eod = getattr(args, "null_tokenizer_eod_id", None)
            self.eod = int(eod) if eod is not None else self.vocab_size - 1
        elif tokenizer is None:
            self.vocab_size = self.eod = None  # check_tokenizer_matches says what is missing
        else:
            self.vocab_size = tokenizer.vocab_size
            self.eod = tokenizer.eod
        self.model_path = None if self.ids_only else args.tokenizer_model
