"""DRLoRAController in one process: statistics, growth at the planned steps, router freeze."""

import pytest
import torch

from megatron_drlora import DRLoRAConfig
from megatron_drlora.controller import DRLoRAController
from tests.tiny import batch, build, randomize_adapters, tiny_args

pytestmark = pytest.mark.usefixtures("megatron_single")


def _train(chunks, controller, steps, lr=1e-2, seed=0, start=0):
    model = chunks[0]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    args = tiny_args()
    reports = []
    for step in range(start, start + steps):
        opt.zero_grad()
        tokens, pos, labels = batch(args, batch_size=4, seed=seed + step)
        model(tokens, pos, None, labels=labels).float().mean().backward()
        reports.append(controller.after_gradients(step))
        opt.step()
    return reports


def test_growth_happens_exactly_at_planned_steps_and_reaches_target():
    args = tiny_args()
    cfg = DRLoRAConfig(budget=8, grow_interval=3, grow_buffer=2, warmup_iters=2)
    chunks, handle = build(args, cfg)
    controller = DRLoRAController(handle, train_iters=20, warmup_iters=None)
    planned = controller.schedule.event_steps()
    assert planned == [2, 5, 8, 11, 14, 17]
    reports = _train(chunks, controller, 20)
    assert [r.step for r in reports if r.event] == planned
    total = controller.rank_map.sum(dim=(1, 2))
    target = [controller.schedule.layer_target(l) for l in range(handle.num_moe_layers)]
    assert total.tolist() == target  # every layer ends exactly at its budget
    assert int(controller.rank_map.max()) <= cfg.rank_max
    assert torch.equal(handle.local_rank_map(), controller.rank_map)
    assert len(set(controller.rank_map.flatten().tolist())) > 1  # ranks are heterogeneous
    for r in reports:
        if r.event:
            assert f"growth event at step {r.step:8d}" in r.log_line()


def test_router_frozen_during_warmup_then_trained():
    args = tiny_args()
    cfg = DRLoRAConfig(budget=8, grow_interval=2, grow_buffer=0, warmup_iters=3)
    chunks, handle = build(args, cfg)
    controller = DRLoRAController(handle, train_iters=8, warmup_iters=None)
    routers = list(handle.router_parameters())
    assert routers and all(p.requires_grad for p in routers)
    before = [p.detach().clone() for p in routers]
    _train(chunks, controller, 3)
    assert all(torch.equal(b, p) for b, p in zip(before, routers)), "router moved in warm-up"
    lora_moved = any(torch.count_nonzero(l.bank.dense_factor("up", "B")) for l in handle.layers)
    assert lora_moved
    _train(chunks, controller, 2, seed=100, start=3)
    assert any(not torch.equal(b, p) for b, p in zip(before, routers)), "router never trained"


def test_routing_statistics_not_counted_twice_under_recompute():
    for recompute in (None, "full"):
        kw = dict(recompute_granularity="full", recompute_method="uniform",
                  recompute_num_layers=1) if recompute else {}
        args = tiny_args(**kw)
        chunks, handle = build(args, DRLoRAConfig(budget=8))
        controller = DRLoRAController(handle, train_iters=1000, warmup_iters=10)
        tokens, pos, labels = batch(args, batch_size=3)
        chunks[0](tokens, pos, None, labels=labels).float().mean().backward()
        assert controller.routing.tokens.tolist() == [3 * args.seq_length] * 2
        assert controller.routing.counts.sum().item() == 2 * 3 * args.seq_length * 2  # top-2
        # evaluation under no_grad does not count
        with torch.no_grad():
            chunks[0](tokens, pos, None)
        assert controller.routing.tokens.tolist() == [3 * args.seq_length] * 2


def test_uniform_method_never_grows_and_frequency_variant_needs_no_grads():
    args = tiny_args()
    chunks, handle = build(args, DRLoRAConfig(budget=8, method="uniform"))
    controller = DRLoRAController(handle, train_iters=10, warmup_iters=0)
    reports = _train(chunks, controller, 4)
    assert not any(r.event for r in reports)
    assert int(controller.rank_map.min()) == int(controller.rank_map.max()) == 8
    chunks, handle = build(args, DRLoRAConfig(budget=8, saliency="frequency", grow_interval=1,
                                              grow_buffer=0, warmup_iters=0))
    controller = DRLoRAController(handle, train_iters=4, warmup_iters=0)
    reports = _train(chunks, controller, 2)
    assert reports[0].event and controller.saliency.frequency.sum() > 0


def test_state_dict_round_trip_and_mismatch_error():
    args = tiny_args()
    cfg = DRLoRAConfig(budget=8, grow_interval=1, grow_buffer=0, warmup_iters=0)
    chunks, handle = build(args, cfg)
    controller = DRLoRAController(handle, train_iters=6, warmup_iters=0)
    _train(chunks, controller, 3)
    state = controller.state_dict()
    chunks2, handle2 = build(args, cfg)
    other = DRLoRAController(handle2, train_iters=6, warmup_iters=0)
    other.load_state_dict(state)
    assert torch.equal(other.rank_map, controller.rank_map)
    assert torch.equal(handle2.local_rank_map(), controller.rank_map)
    assert torch.equal(other.saliency.frequency, controller.saliency.frequency)
    chunks3, handle3 = build(args, DRLoRAConfig(budget=12, grow_interval=1, grow_buffer=0,
                                                warmup_iters=0))
    third = DRLoRAController(handle3, train_iters=6, warmup_iters=0)
    with pytest.raises(ValueError, match=r"budget 8 \(this run: 12\), r_init 4 \(this run: 6\)"):
        third.load_state_dict(state)
    other.load_state_dict(state, new_run=True)  # --finetune: only the shapes must agree


def _one_step(chunks, controller, step, scale=1.0):
    """Forward/backward of one batch, then collect(): what finalize_model_grads_func does."""
    args = tiny_args()
    model = chunks[0]
    for p in model.parameters():
        p.grad = None
    tokens, pos, labels = batch(args, batch_size=4, seed=step)
    (scale * model(tokens, pos, None, labels=labels).float().mean()).backward()
    controller.collect(step, loss_scale=scale)


def test_skipped_or_nonfinite_step_leaves_the_saliency_untouched_but_events_still_run():
    args = tiny_args()
    cfg = DRLoRAConfig(budget=8, grow_interval=2, grow_buffer=0, warmup_iters=1)
    chunks, handle = build(args, cfg)
    controller = DRLoRAController(handle, train_iters=6, warmup_iters=None)
    _one_step(chunks, controller, 0)
    controller.finish(0, stepped=True)
    before = {k: v.clone() for k, v in controller.saliency.state_dict().items()}
    _one_step(chunks, controller, 1)                  # step 1 is a growth event
    report = controller.finish(1, stepped=False)      # ... that Megatron skipped
    assert report.dropped == "the optimizer skipped this step" and report.event
    after = controller.saliency.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in ("frequency", "updates"))
    # non-finite statistics (an inf gradient): dropped with the EMAs unchanged
    _one_step(chunks, controller, 2)
    next(handle.layers[0].bank.parameters()).grad.view(-1)[0] = float("inf")
    controller.collect(2)
    snapshot = {k: v.clone() for k, v in controller.saliency.state_dict().items()}
    report = controller.finish(2, stepped=True)
    assert report.dropped.startswith("non-finite")
    assert all(torch.equal(snapshot[k], v) for k, v in controller.saliency.state_dict().items())


def test_loss_scale_is_divided_out_of_the_rank_importance():
    """fp16: gradients are scaled by the loss scale; the importance must not be."""
    args = tiny_args()
    cfg = DRLoRAConfig(budget=8, grow_interval=2, grow_buffer=0, warmup_iters=1)
    results = []
    for scale in (1.0, 1024.0):
        chunks, handle = build(args, cfg)
        randomize_adapters(handle, scale=0.1)
        controller = DRLoRAController(handle, train_iters=6, warmup_iters=None)
        _one_step(chunks, controller, 0, scale=scale)
        controller.finish(0, stepped=True)
        results.append(controller.saliency.state_dict()["importance"].clone())
    ref = results[0]
    assert ref.abs().max() > 0
    assert torch.allclose(results[1], ref, rtol=1e-5, atol=1e-7 * float(ref.abs().max()))
