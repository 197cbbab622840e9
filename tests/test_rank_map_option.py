"""--drlora-rank-map: a run that starts from a given heterogeneous rank map and never grows
(the static-allocation control of the quality benchmark)."""

import argparse
import json

import pytest
import torch

from megatron_drlora import DRLoRAConfig
from megatron_drlora.config import DRLoRAConfigError, add_drlora_args, config_from_args
from megatron_drlora.controller import DRLoRAController
from megatron_drlora.inject import DRLoRAInjectionError
from megatron_drlora.schedule import GrowthSchedule
from tests.tiny import batch, build, tiny_args

# tiny_args: 2 MoE layers x 4 experts; targets up, down; budget 4 -> 32 module-ranks a layer
MAP = [[[8, 8], [4, 4], [2, 2], [2, 2]], [[1, 1], [0, 8], [8, 6], [4, 4]]]


def test_rank_map_from_file_disables_growth_and_survives_serialisation(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"rank_map": MAP}))
    parser = add_drlora_args(argparse.ArgumentParser())
    args = parser.parse_args(["--drlora-budget", "4", "--drlora-rank-map", str(path)])
    cfg = config_from_args(args)
    assert cfg.rank_map == MAP and not cfg.grows and "rank_map=fixed" in cfg.summary()
    assert DRLoRAConfig.from_dict(cfg.to_dict()).rank_map == MAP  # the checkpoint keeps the map
    schedule = GrowthSchedule.build(cfg, train_iters=100, warmup_iters=5, modules_per_layer=[8, 8])
    assert not schedule.grows and schedule.event_steps() == []
    path.write_text(json.dumps(MAP))  # a bare list works too
    assert DRLoRAConfig(budget=4, rank_map=str(path)).rank_map == MAP


@pytest.mark.parametrize("rank_map, settings, message", [
    ([[[9, 8], [4, 4], [2, 2], [2, 2]]], {}, "[0, r_max=8]"),
    ([[[-1, 8], [4, 4], [2, 2], [2, 2]]], {}, "[0, r_max=8]"),
    ([[[8, 8], [8, 4], [2, 2], [2, 2]]], {}, "layer 0 uses 36 module-ranks, over its budget"),
    ([[[4, 4], [4, 4], [4, 4], [4, 4]], [[8, 8], [4, 4], [4, 4], [4, 4]]],
     {"allocation": "global"}, "uses 72 module-ranks, over the budget"),
    ([[[4], [4], [4], [4]]], {}, "2 rank(s) per expert"),
    ([[[4, 4], [4, 4]], [[4, 4]]], {}, "same number of experts"),
    ([[[4, 4.5], [4, 4], [4, 4], [4, 4]]], {}, "integers"),
    ([[[4, 4], [4, 4], [4, 4], [4, 4]]], {"method": "uniform"}, "--drlora-method drlora"),
])
def test_rank_map_validation_names_the_flag(rank_map, settings, message):
    with pytest.raises(DRLoRAConfigError, match="--drlora-rank-map") as err:
        DRLoRAConfig(budget=4, rank_map=rank_map, **settings)
    assert message in str(err.value)


def test_global_allocation_may_move_ranks_between_layers():
    moved = [[[8, 8], [8, 4], [2, 2], [2, 2]], [[4, 4], [4, 4], [4, 4], [0, 0]]]
    assert DRLoRAConfig(budget=4, allocation="global", rank_map=moved).rank_map == moved


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DRLoRAConfigError, match="does not exist"):
        DRLoRAConfig(budget=4, rank_map=str(tmp_path / "nope.json"))


@pytest.mark.usefixtures("megatron_single")
def test_run_keeps_the_given_map_and_never_grows():
    args = tiny_args()
    chunks, handle = build(args, DRLoRAConfig(budget=4, grow_interval=1, grow_buffer=0,
                                              warmup_iters=0, rank_map=MAP))
    controller = DRLoRAController(handle, train_iters=4, warmup_iters=0)
    assert controller.rank_map.tolist() == MAP
    assert handle.local_rank_map().tolist() == MAP  # pushed into the banks
    model = chunks[0]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(4):
        opt.zero_grad()
        tokens, pos, labels = batch(args, batch_size=4, seed=step)
        model(tokens, pos, None, labels=labels).float().mean().backward()
        assert not controller.after_gradients(step).event
        opt.step()
    assert controller.rank_map.tolist() == MAP and not controller.events
    # an expert whose map entry is 0 has no active rank: its B stays at zero
    bank = handle.layers[1].bank
    assert int(bank.ranks[1, 0]) == 0


@pytest.mark.usefixtures("megatron_single")
def test_map_of_another_model_shape_is_refused():
    args = tiny_args(num_experts=8)
    with pytest.raises(DRLoRAInjectionError, match="needs \\(2, 8, 2\\)"):
        chunks, handle = build(args, DRLoRAConfig(budget=4, rank_map=MAP))
        DRLoRAController(handle, train_iters=4, warmup_iters=0)
