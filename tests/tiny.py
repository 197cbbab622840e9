"""Tiny MoE models and deterministic adapter values shared by tests (in-process and workers)."""

from __future__ import annotations

import hashlib

import torch

from megatron_drlora import DRLoRAConfig
from megatron_drlora.inject import apply_drlora
from megatron_drlora.modeling import MoEModelArgs, build_gpt_moe, init_from_global_identity


def tiny_args(**overrides) -> MoEModelArgs:
    base = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                num_experts=4, moe_router_topk=2, vocab_size=64, seq_length=16)
    base.update(overrides)
    return MoEModelArgs(**base)


def build(args: MoEModelArgs, config: DRLoRAConfig = None, base_seed: int = 0):
    chunks = build_gpt_moe(args)
    init_from_global_identity(chunks, seed=base_seed)
    handle = apply_drlora(chunks, config, log=lambda s: None) if config is not None else None
    return chunks, handle


def batch(args: MoEModelArgs, batch_size: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (batch_size, args.seq_length), generator=g)
    position_ids = torch.arange(args.seq_length).unsqueeze(0).expand(batch_size, -1)
    labels = torch.roll(tokens, -1, dims=1)
    return tokens, position_ids, labels


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8],
                          "little") & ((1 << 63) - 1)


@torch.no_grad()
def randomize_adapters(handle, seed: int = 7, scale: float = 0.05) -> None:
    """Non-zero B (and fresh A) for every adapter, layout-independent (full draw, then slice)."""
    for layer in handle.layers:
        bank = layer.bank
        for name in bank.projection_names:
            spec = bank.specs[name]
            # dense values, written through the accessor both banks have (a pooled bank keeps
            # the active ranks' values)
            a, b = bank.dense_factor(name, "A"), bank.dense_factor(name, "B")
            for local, expert in enumerate(bank.global_expert_ids):
                g = torch.Generator().manual_seed(_seed(seed, layer.layer, expert, name))
                full_a = torch.randn(bank.r_max, spec.in_features, generator=g) * scale
                full_b = torch.randn(spec.out_features, bank.r_max, generator=g) * scale
                if spec.a_sharded:
                    w = spec.in_local
                    full_a = full_a[:, spec.tp_rank * w:(spec.tp_rank + 1) * w]
                if spec.b_sharded:
                    w = spec.out_local
                    full_b = full_b[spec.tp_rank * w:(spec.tp_rank + 1) * w]
                a[local].copy_(full_a)
                b[local].copy_(full_b)
            bank.write_dense_factor(name, "A", a)
            bank.write_dense_factor(name, "B", b)


def grown_rank_map(handle, seed: int = 3) -> torch.Tensor:
    """A rank map with experts at different ranks in [1, r_max] that growth could reach: each
    layer within its budget (experts x projections x r_target), which is what the rank pool
    holds. Random ranks, scaled down where a layer's sum is over."""
    g = torch.Generator().manual_seed(seed)
    shape = handle.rank_map_shape()
    ranks = torch.randint(1, handle.config.rank_max + 1, shape, generator=g)
    cap = shape[1] * shape[2] * handle.config.budget
    for layer in ranks:
        total = int(layer.sum())
        if total > cap:
            layer.copy_((layer * cap // total).clamp(min=1))
    return ranks


def save_adapter_checkpoint(root: str, iteration: int, chunks, handle, rank_map) -> str:
    """A DR-LoRA checkpoint with the structure Megatron-LM writes through
    megatron_lm.checkpoint_view (adapters, router, DR-LoRA state in the common state), for
    export tests that need one without a training run."""
    import os

    from megatron.core import dist_checkpointing

    from megatron_drlora.checkpoint import STATE_KEY, adapter_sharded_state_dict, iteration_dir

    model = adapter_sharded_state_dict(handle)
    for key, value in chunks[0].sharded_state_dict().items():
        if ".mlp.router." in key:
            model[key] = value
    model[STATE_KEY] = {"config": handle.config.to_dict(), "rank_map": rank_map.clone()}
    path = iteration_dir(root, iteration)
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save({"model": model, "iteration": iteration}, path)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write(str(iteration))
    return path


def save_run_like_checkpoint(base: str, adapters: str, seq: int, vocab: int, tokens):
    """A DR-LoRA checkpoint of a converted base as a run leaves it: adapters with grown ranks
    (up, down; budget 4), a trained router and, where the router has one, an expert bias moved
    (Megatron's bias update, here by hand). Returns (model args, handle, base logits, rank
    map); the base logits are the Megatron model's before the adapters."""
    import os

    from megatron_drlora.hf import verify

    margs = verify.model_args_from_file(os.path.join(base, "model.args"), seq)
    chunks, _ = verify.build_megatron(margs, base)
    base_logits = verify.megatron_logits(chunks, tokens, vocab)
    handle = apply_drlora(chunks, DRLoRAConfig(budget=4, p_grow=0.5, targets=("up", "down")),
                          log=lambda s: None)
    randomize_adapters(handle, scale=0.1)
    rank_map = grown_rank_map(handle)
    handle.set_rank_map(rank_map)
    with torch.no_grad():
        for layer in handle.layers:
            router = layer.moe_layer.router
            g = torch.Generator().manual_seed(layer.layer)
            router.weight.add_(0.3 * torch.randn(router.weight.shape, generator=g))
            if router.expert_bias is not None:
                router.expert_bias.add_(0.2 * torch.randn(router.expert_bias.shape,
                                                          generator=g))
    save_adapter_checkpoint(adapters, 7, chunks, handle, rank_map)
    return margs, handle, base_logits, rank_map


class CPUGroupedLinear(torch.nn.Module):
    """Stands in for TE's GroupedLinear: forward(x, m_splits) with per-expert weights."""

    def __init__(self, num_experts, in_f, out_f, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(num_experts, out_f, in_f, generator=g) * 0.1)

    def forward(self, x, m_splits):
        outs = [chunk @ self.weight[e].T for e, chunk in enumerate(torch.split(x, m_splits))]
        return torch.cat(outs), None


def dense_grads(bank, attr: str = "grad"):
    """{(projection, A|B): dense gradient [E, r_max, k] / [E, d, r_max]} of either bank (a
    pooled one's mapped through its slot table, zero at inactive ranks); `attr` 'main_grad'
    reads Megatron DDP's buffers."""
    out = {}
    for name in bank.projection_names:
        for which in ("A", "B"):
            if bank.pooled:
                grads = {side: getattr(getattr(bank, side), attr)
                         for side in ("slots_hidden", "slots_ffn")}
                out[name, which] = bank.dense_from(name, which, grads)
            else:
                out[name, which] = getattr(bank.factor(name, which), attr)
    return out
