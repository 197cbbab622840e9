"""GrowthSchedule: the paper's Table 10 exactly, event arithmetic, edge cases and errors."""

import dataclasses

import pytest

from megatron_drlora.config import DRLoRAConfig
from megatron_drlora.schedule import (GrowthSchedule, budget_shortfall_message,
                                      exact_floor_product, per_event_cap,
                                      warmup_iterations)

OLMOE_MODS = [128] * 16  # 16 layers x 64 experts x (up, down)
TABLE_10 = [  # step, events so far, total active ranks, average rank (2 decimals)
    (0, 0, 65536, 32.00),
    (6000, 25, 74736, 36.49),
    (12000, 55, 85776, 41.88),
    (18000, 85, 96816, 47.27),
    (24000, 115, 107856, 52.66),
    (30000, 145, 118896, 58.05),
    (37800, 184, 131072, 64.00),
]


def olmoe(**overrides):
    cfg = DRLoRAConfig(budget=64, r_init=32, r_max=128, **overrides)
    return GrowthSchedule.build(cfg, 38000, 1140, OLMOE_MODS)


def test_table10_constants():
    s = olmoe()
    assert (s.t_warmup, s.t_end, s.n_events, s.cap) == (1140, 37800, 183, 9)
    assert all(s.quota(l) == 23 for l in range(16))
    assert s.layer_target(0) == 128 * 64 and s.layer_initial(0) == 128 * 32
    assert s.target_reached_event() == 179
    assert s.event_step(179) == 1140 + 178 * 200


@pytest.mark.parametrize("step,events,total,avg", TABLE_10)
def test_table10_trajectory(step, events, total, avg):
    s = olmoe()
    assert s.events_through(step) == events
    assert s.planned_total_active(step) == total
    assert round(s.planned_average_rank(step), 2) == avg


def test_table10_global_allocation_same_totals():
    s = olmoe(allocation="global")
    for step, _, total, _ in TABLE_10:
        assert s.planned_total_active(step) == total
    assert s.target_reached_event() == 179


def test_event_steps_and_is_event_agree():
    s = olmoe()
    steps = s.event_steps()
    assert steps[0] == 1140 and steps[-1] == 37740 and len(steps) == 184 == s.num_event_steps
    assert s.last_event_step == 37740
    assert all(b - a == 200 for a, b in zip(steps, steps[1:]))
    as_set = set(steps)
    assert [t for t in range(38000) if s.is_event(t)] == steps
    # events_through counts the events at steps <= t, the event at t included.
    for t in (0, 1139, 1140, 1141, 1339, 1340, 37739, 37740, 37999):
        assert s.events_through(t) == sum(1 for e in steps if e <= t)
        assert s.is_event(t) == (t in as_set)


def test_planned_totals_monotone_and_capped():
    s = olmoe()
    prev = 0
    for t in range(0, 38000, 97):
        total = s.planned_total_active(t)
        assert prev <= total <= 16 * 128 * 64
        prev = total
    assert s.planned_total_active(37999) == 16 * 128 * 64


def test_event_at_t_end_when_aligned():
    cfg = DRLoRAConfig(budget=8, grow_interval=10, grow_buffer=10)
    s = GrowthSchedule.build(cfg, 100, 20, [4])
    # t_end = 90, events at 20, 30, ..., 90: T_events = 7 intervals, 8 events.
    assert s.t_end == 90 and s.n_events == 7
    assert s.event_steps() == list(range(20, 91, 10))
    assert s.quota(0) == -(-4 * 4 // 7) == 3


def test_zero_buffer_drops_the_step_past_the_run():
    cfg = DRLoRAConfig(budget=8, grow_interval=10, grow_buffer=0)
    s = GrowthSchedule.build(cfg, 100, 0, [4])
    assert s.t_end == 100 and s.n_events == 10
    assert s.event_steps()[-1] == 90  # step 100 is not a step of a 100-iteration run
    assert not s.is_event(100)
    assert s.target_reached_event() is not None


def test_warmup_zero_first_event_at_step_zero():
    cfg = DRLoRAConfig(budget=8, grow_interval=10, grow_buffer=10)
    s = GrowthSchedule.build(cfg, 100, 0, [2, 6])
    assert s.is_event(0) and s.events_through(0) == 1
    assert [s.quota(0), s.quota(1)] == [-(-2 * 4 // 9), -(-6 * 4 // 9)]
    assert s.layer_target(1) == 48


def test_per_layer_quotas_with_different_module_counts():
    cfg = DRLoRAConfig(budget=16)
    s = GrowthSchedule.build(cfg, 10000, 300, [16, 128, 2])
    T = (9800 - 300) // 200
    assert s.n_events == T
    assert s.quotas == tuple(-(-n * 8 // T) for n in (16, 128, 2))
    assert s.total_modules == 146


def test_config_warmup_overrides_argument():
    cfg = DRLoRAConfig(budget=16, warmup_iters=500)
    s = GrowthSchedule.build(cfg, 10000, 300, [8])
    assert s.t_warmup == 500 and s.event_steps()[0] == 500


def test_cap_exact_decimal():
    assert exact_floor_product(0.1, 96) == 9
    assert exact_floor_product(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in floats
    cfg = DRLoRAConfig(budget=64, r_init=32, r_max=132, p_grow=0.29)
    assert GrowthSchedule.build(cfg, 38000, 1140, [4]).cap == 29


@pytest.mark.parametrize("p_grow,r_init,r_max", [(0.1, 32, 128), (0.29, 32, 132),
                                                 (1 / 3, 2, 6), (1.0, 1, 2), (0.5, 3, 4)])
def test_one_cap_for_config_and_schedule(p_grow, r_init, r_max):
    """The schedule's cap is per_event_cap, and a config is valid iff that cap is >= 1."""
    cap = per_event_cap(p_grow, r_max, r_init)
    assert cap == exact_floor_product(p_grow, r_max - r_init)
    if cap < 1:
        with pytest.raises(ValueError, match="--drlora-p-grow"):
            DRLoRAConfig(budget=r_init + 1, r_init=r_init, r_max=r_max, p_grow=p_grow)
    else:
        cfg = DRLoRAConfig(budget=r_init + 1, r_init=r_init, r_max=r_max, p_grow=p_grow)
        assert GrowthSchedule.build(cfg, 38000, 1140, [4]).cap == cap


def test_cap_binds_when_quota_is_larger():
    # Short run: Q = ceil(2 * 15 / 1) = 30 > N_mod * cap = 2 * 1, so each event adds only 2.
    cfg = DRLoRAConfig(budget=16, r_init=1, r_max=16, p_grow=0.1, grow_interval=10,
                       grow_buffer=0)
    s = GrowthSchedule.build(cfg, 25, 10, [2])
    assert s.n_events == 1 and s.quota(0) == 30 and s.cap == 1
    assert s.planned_total_active(24) == 2 * 1 + 2 * 1 * 2
    assert s.target_reached_event() is None


def test_budget_shortfall_message():
    cfg = DRLoRAConfig(budget=16, r_init=1, r_max=16, p_grow=0.1, grow_interval=10,
                       grow_buffer=0)
    s = GrowthSchedule.build(cfg, 25, 10, [2, 2])
    # Each layer: 2 + 2 events x 2 = 6 of its target 32, so 26 short, 52 in all.
    msg = budget_shortfall_message(s)
    assert msg is not None and "52 module-ranks short" in msg, msg
    for flag in ("--drlora-p-grow", "--drlora-rank-max", "--train-iters"):
        assert flag in msg
    assert budget_shortfall_message(olmoe()) is None
    assert budget_shortfall_message(olmoe(allocation="global")) is None
    uniform = GrowthSchedule.build(DRLoRAConfig(budget=16, method="uniform"), 50, 10, [8])
    assert budget_shortfall_message(uniform) is None


def test_router_trainable():
    s = olmoe()
    assert not s.router_trainable(1139) and s.router_trainable(1140)
    assert not s.router_trainable(5000, "frozen")
    assert s.router_trainable(0, "trained")
    frozen = olmoe(router="frozen")
    assert not frozen.router_trainable(20000)
    with pytest.raises(ValueError, match="--drlora-router"):
        s.router_trainable(0, "sometimes")


def test_uniform_has_no_events():
    cfg = DRLoRAConfig(budget=16, method="uniform")
    s = GrowthSchedule.build(cfg, 50, 10, [8, 8])  # far too short to grow: must still work
    assert not s.grows and s.n_events == 0 and s.event_steps() == []
    assert s.quotas == (0, 0) and s.cap == 0 and s.last_event_step is None
    assert not any(s.is_event(t) for t in range(50))
    assert s.events_through(49) == 0
    assert s.planned_total_active(0) == s.planned_total_active(49) == 16 * 16
    assert s.target_reached_event() == 0
    assert s.router_trainable(10) and not s.router_trainable(9)


def test_no_growth_when_r_init_equals_budget():
    cfg = DRLoRAConfig(budget=16, r_init=16, r_max=32)
    s = GrowthSchedule.build(cfg, 10000, 100, [4])
    assert not s.grows and s.event_steps() == []


def test_frozen_dataclass():
    s = olmoe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.cap = 3


@pytest.mark.parametrize("kwargs,train,warmup,flag", [
    ({}, 1000, 900, "--lr-warmup-iters"),          # warm-up past t_end = 800
    ({}, 1000, 800, "--lr-warmup-iters"),          # warm-up == t_end
    ({}, 1000, 700, "--drlora-grow-interval"),     # 100 steps < one interval
    ({"grow_buffer": 5000}, 1000, 0, "--drlora-grow-buffer"),
    ({"warmup_iters": 950}, 1000, 0, "--drlora-warmup-iters"),
    ({}, 0, 0, "--train-iters"),
    ({}, 1000, -1, "--lr-warmup-iters"),
    ({}, 1000, None, "--lr-warmup-iters"),
])
def test_errors_name_the_flag(kwargs, train, warmup, flag):
    cfg = DRLoRAConfig(budget=16, **kwargs)
    with pytest.raises(ValueError, match=flag):
        GrowthSchedule.build(cfg, train, warmup, [8])


def test_grow_buffer_none_is_an_error():
    with pytest.raises(ValueError, match="--drlora-grow-buffer"):
        GrowthSchedule.build(DRLoRAConfig(budget=16, grow_buffer=None), 10000, 100, [8])


def test_too_short_message_mentions_all_fixes():
    cfg = DRLoRAConfig(budget=16)
    with pytest.raises(ValueError) as e:
        GrowthSchedule.build(cfg, 1000, 700, [8])
    for flag in ("--drlora-grow-interval", "--lr-warmup-iters", "--drlora-grow-buffer",
                 "--train-iters"):
        assert flag in str(e.value)


@pytest.mark.parametrize("mods", [[], [0], [4, -1], [2.0]])
def test_bad_modules_per_layer(mods):
    with pytest.raises(ValueError, match="modules_per_layer"):
        GrowthSchedule.build(DRLoRAConfig(budget=16), 10000, 100, mods)


def test_event_step_range():
    s = olmoe()
    with pytest.raises(ValueError):
        s.event_step(0)
    with pytest.raises(ValueError):
        s.event_step(185)


def test_warmup_iterations_follow_megatron():
    """Megatron warms up for fraction * lr_decay_iters (default train_iters), else the iters."""
    assert warmup_iterations(38000, lr_warmup_fraction=0.03) == 1140
    assert warmup_iterations(1000, lr_warmup_fraction=0.0125) == 12  # 12.5: floor, not round
    assert warmup_iterations(1000, lr_warmup_fraction=0.0135) == 13  # 13.5: floor, not round
    assert warmup_iterations(1000, lr_warmup_fraction=0.1, lr_decay_iters=500) == 50
    assert warmup_iterations(100, lr_warmup_fraction=0.29) == 29  # exact decimal, not 28
    assert warmup_iterations(1000, lr_warmup_iters=70) == 70
    assert warmup_iterations(1000, lr_warmup_iters=70, lr_decay_iters=500) == 70
    assert warmup_iterations(1000) == 0
    for bad in (dict(lr_warmup_fraction=1.5), dict(lr_warmup_fraction=-0.1),
                dict(lr_warmup_iters=-1), dict(lr_warmup_fraction=0.1, lr_decay_iters=0)):
        with pytest.raises(ValueError, match="--lr-"):
            warmup_iterations(100, **bad)
