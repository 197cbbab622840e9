"""SparseMixer-v2 top-2 routing (Phi-3.5-MoE, Phi-mini-MoE; arXiv 2409.12136) as a Megatron-Core
router.

Eval mode (deterministic; transformers' `PhimoeTopKRouter` in `model.eval()`): the first expert
is the arg-max of the router logits; its weight is the softmax, at that expert, over the logits
that lie within a relative distance 2 * eps of the maximum (`(max - s) / max(|s|, max) <= 2 eps`,
the rest masked to -inf). The second expert is the arg-max with the first masked out, weighted
the same way relative to the second maximum. The two weights are not renormalised. `eps` is the
HF config's `router_jitter_noise`.

Training mode is transformers' training-mode sparsemixer: each of the two experts is sampled
from the masked softmax (Gumbel-max), its weight carries Heun's third-order gradient estimate
(`_HeunMultiplier`: forward `w * m` with m = 1 when the sample is the arg-max, else 1 or 1/3 with
probability 1/4 and 3/4; backward to the logits `m w (onehot - softmax)` per selected expert). The
random draws are made in transformers' order from torch's default generator, so with the same
seed both give the same experts, weights and gradients (tests/test_phimoe.py).

The router returns what Megatron's TopKRouter returns (dense `probs` [tokens, experts], boolean
`routing_map`), so the token dispatchers and DR-LoRA's routing statistics hook see the sampled
routing unchanged. Megatron's aux / z losses still apply when configured (computed from the
logits by Megatron, as for any router).
"""

from __future__ import annotations

import functools

import torch

ROUTER_TYPES = ("topk", "sparsemixer")


class _HeunMultiplier(torch.autograd.Function):
    """Forward: multiplier * mask_for_one. Backward: the gradient w.r.t. the router logits of
    the SparseMixer estimate (the multiplier's own autograd graph is not used)."""

    @staticmethod
    def forward(ctx, scores, multiplier, selected, masked_gates, mask_for_one):
        ctx.save_for_backward(multiplier, selected, masked_gates)
        return multiplier * mask_for_one

    @staticmethod
    def backward(ctx, grad_out):
        multiplier, selected, masked_gates = ctx.saved_tensors
        grad_out = grad_out * multiplier
        grad_scores = masked_gates * grad_out.mul(-1)
        grad_scores.scatter_add_(dim=-1, index=selected, src=grad_out)
        return grad_scores, None, None, None, None


def _mask_far_from(scores: torch.Tensor, candidates: torch.Tensor, eps: float):
    """(candidates with logits further than 2 eps (relative) below their max set to -inf, the
    arg-max of candidates)."""
    with torch.no_grad():
        threshold, max_ind = candidates.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=threshold)
        far = ((threshold - scores) / factor) > (2 * eps)
    return candidates.masked_fill(far, float("-inf")), max_ind


def _gumbel_argmax(masked: torch.Tensor) -> torch.Tensor:
    noise = torch.empty_like(masked, memory_format=torch.legacy_contiguous_format).exponential_()
    return (masked - noise.log()).max(dim=-1)[1].unsqueeze(-1)


def _pick(scores, candidates, eps: float, training: bool, second: bool = False):
    """One expert per token and its weight (see the module docstring). For the second expert
    transformers draws its uniform numbers twice (`rand_like(...).uniform_()`); so do we, to
    stay on the same random stream."""
    masked, max_ind = _mask_far_from(scores, candidates, eps)
    selected = _gumbel_argmax(masked) if training else max_ind
    gates = torch.softmax(masked, dim=-1)
    weight = gates.gather(dim=-1, index=selected)
    if not training:
        return weight, selected
    max_gate, top = gates.max(dim=-1, keepdim=True)
    uniform = torch.rand_like(max_gate)
    if second:
        uniform = uniform.uniform_()
    mask_for_one = torch.logical_or(selected == top, uniform > 0.75)
    mask_for_one = torch.add(0.3333, mask_for_one, alpha=0.6667).type_as(gates)
    return _HeunMultiplier.apply(scores, weight, selected, gates, mask_for_one), selected


def sparsemixer(scores: torch.Tensor, jitter_eps: float, training: bool):
    """(weights [tokens, 2], experts [tokens, 2]) of SparseMixer top-2 routing of router logits
    `scores` [tokens, experts]."""
    weight1, expert1 = _pick(scores, scores, jitter_eps, training)
    without_first = torch.scatter(scores, -1, expert1, float("-inf"))
    weight2, expert2 = _pick(scores, without_first, jitter_eps, training, second=True)
    return torch.cat((weight1, weight2), dim=-1), torch.cat((expert1, expert2), dim=-1)


def _topk_router_class():
    from megatron.core.transformer.moe.router import TopKRouter

    return TopKRouter


class _SparseMixerMixin:
    """routing() of a Megatron TopKRouter replaced by sparsemixer (see the module docstring)."""

    jitter_eps: float = 0.01

    def _check_config(self) -> None:
        c = self.config
        unsupported = {
            "--moe-router-topk (sparsemixer is top-2)": c.moe_router_topk != 2,
            "--moe-expert-capacity-factor": c.moe_expert_capacity_factor is not None,
            "--moe-router-enable-expert-bias": bool(c.moe_router_enable_expert_bias),
            "--moe-router-load-balancing-type sinkhorn / quantile_balancing":
                self.routing_type in ("sinkhorn", "quantile_balancing"),
            "--moe-input-jitter-eps": c.moe_input_jitter_eps is not None,
        }
        bad = [flag for flag, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ValueError(f"--moe-router-type sparsemixer cannot be combined with "
                             f"{', '.join(bad)}")

    def routing(self, logits: torch.Tensor, padding_mask=None):
        from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss

        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        weights, experts = sparsemixer(logits, self.jitter_eps, self.training)
        probs = torch.zeros_like(logits).scatter(1, experts, weights)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, experts, True)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            aux_map, aux_scores = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, fused=self.config.moe_router_fusion,
                padding_mask=padding_mask)
            masked = padding_mask is not None
            probs = self._apply_aux_loss(probs, aux_scores, aux_map, with_padding_mask=masked)
            probs = self._apply_seq_aux_loss(probs, aux_scores, aux_map, seq_length, bsz,
                                             with_padding_mask=masked)
            probs = self._apply_global_aux_loss(probs, aux_scores, aux_map,
                                                with_padding_mask=masked)
        return probs, routing_map


@functools.lru_cache(maxsize=None)
def _router_class():
    """SparseMixerRouter built lazily: megatron.core is imported only when a model is built."""
    base = _topk_router_class()

    class SparseMixerRouter(_SparseMixerMixin, base):
        def __init__(self, config, pg_collection=None, is_mtp_layer=False, jitter_eps=0.01):
            super().__init__(config=config, pg_collection=pg_collection,
                             is_mtp_layer=is_mtp_layer)
            self.jitter_eps = float(jitter_eps)
            self._check_config()

    return SparseMixerRouter


def __getattr__(name):  # SparseMixerRouter without importing megatron.core at import time
    if name == "SparseMixerRouter":
        return _router_class()
    raise AttributeError(name)


def router_builder(router_type: str, jitter_eps: float = 0.01):
    """What MoESubmodules.router takes for `--moe-router-type` (None: Megatron's default)."""
    if router_type == "topk":
        return None
    if router_type != "sparsemixer":
        raise ValueError(f"--moe-router-type {router_type!r}: choose one of "
                         f"{', '.join(ROUTER_TYPES)}")
    if not jitter_eps >= 0:
        raise ValueError(f"--moe-sparsemixer-jitter-eps {jitter_eps}: must be >= 0")
    return functools.partial(_router_class(), jitter_eps=jitter_eps)
