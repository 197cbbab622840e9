"""Megatron-LM GPT (MoE) training with DR-LoRA: Megatron-LM's own loop plus the DR-LoRA plugin.

    torchrun --nproc_per_node 8 examples/pretrain_gpt.py <Megatron-LM flags> \\
        --pretrained-checkpoint BASE --drlora-budget 16

The shape of Megatron-LM's `pretrain_gpt.py`: a model provider, a forward step with a per-token
loss, a datasets provider, and `megatron.training.pretrain`. DR-LoRA enters through the
`extra_args_provider` (`--drlora-*`) and the model provider. Without any `--drlora-*` flag the
whole model trains (how the demo and the tests make a base). `--help` lists every flag.
"""

import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_drlora.compat.megatron import prepare_import  # noqa: E402

prepare_import()  # before megatron: Python 3.11 shim, triton stub on CPU

import torch  # noqa: E402

from megatron_drlora.megatron_lm import setup  # noqa: E402  (argument parsing, batches, data)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, report_drlora: bool):
    """Sum of per-token losses and the token count: Megatron-LM divides per token with
    --calculate-per-token-loss, else per micro-batch, and logs `lm loss` per token."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    rerun = get_rerun_state_machine()
    rerun.validate_result(result=loss, rejection_func=torch.isnan,
                          message="found NaN in local forward loss calculation",
                          tolerance=0.0, fatal=True)
    rerun.validate_result(result=loss, rejection_func=torch.isinf,
                          message="found Inf in local forward loss calculation",
                          tolerance=0.0, fatal=True)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    if report_drlora:
        report.update(setup.drlora_loss_report(loss.device))
    return loss, num_tokens, report


def forward_step(data_iterator, model):
    """One micro-batch: tokens -> per-token losses (last stage) and the loss function."""
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = setup.get_batch(data_iterator)
    timers("batch-generator").stop()
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"], loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"], report_drlora=model.training)


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    return setup.gpt_datasets(train_val_test_num_samples)


datasets_provider.is_distributed = True  # every rank reads its own batches (gloo and NCCL)


if __name__ == "__main__":  # dist_checkpointing's workers re-import __main__
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    from megatron_drlora.megatron_lm.model_provider import model_provider

    config = setup.parse_args()
    pretrain(config, datasets_provider, ModelType.encoder_or_decoder, forward_step,
             model_provider=model_provider)
