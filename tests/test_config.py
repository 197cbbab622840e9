"""DRLoRAConfig defaults, validation messages, YAML and CLI generation."""

import argparse

import pytest

from megatron_drlora.config import (DRLoRAConfig, DRLoRAConfigError, add_drlora_args,
                                    config_from_args, drlora_flags_given)


def test_paper_defaults():
    c = DRLoRAConfig(budget=16)
    assert (c.rank_init, c.rank_max, c.lora_alpha, c.scale) == (8, 32, 64.0, 2.0)
    assert c.targets == ("up", "down") and c.beta == 0.9 and c.gamma == 1.2
    assert c.p_grow == 0.1 and c.grow_interval == 200 and c.grow_buffer == 200
    assert c.allocation == "layer" and c.grows
    u = DRLoRAConfig(budget=16, method="uniform")
    assert (u.rank_init, u.rank_max, u.scale, u.grows) == (16, 16, 2.0, False)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(budget=16, r_init=20), "r_init=20 exceeds the budget 16"),
    (dict(budget=16, r_max=8), "budget=16 exceeds r_max=8"),
    (dict(budget=0), "'budget' (--drlora-budget): must be a positive integer"),
    (dict(budget=-4), "must be a positive integer"),
    (dict(budget=16, r_init=0), "'r_init' (--drlora-rank-init): must be a positive rank"),
    (dict(budget=16, r_max=-1), "--drlora-rank-max"),
    (dict(budget=16, p_grow=0.0), "'p_grow' (--drlora-p-grow): must be in (0, 1]"),
    (dict(budget=16, p_grow=1.5), "must be in (0, 1]"),
    (dict(budget=16, beta=1.0), "'beta' (--drlora-beta): must be in [0, 1)"),
    (dict(budget=16, beta=-0.1), "must be in [0, 1)"),
    (dict(budget=16, gamma=-1), "'gamma'"),
    (dict(budget=16, targets=("up", "q_proj")), "unknown projection(s) ['q_proj']"),
    (dict(budget=16, targets=()), "needs at least one projection"),
    (dict(budget=16, targets=("up", "up")), "lists a projection twice"),
    (dict(budget=16, dropout=1.0), "'dropout'"),
    (dict(budget=16, alpha=0), "'alpha'"),
    (dict(budget=16, allocation="model"), "'allocation' (--drlora-allocation): unknown value"),
    (dict(budget=16, saliency="random"), "'saliency'"),
    (dict(budget=16, method="adalora"), "'method'"),
    (dict(budget=16, router="sometimes"), "'router'"),
    (dict(budget=4), "floor((8 - 2) * 0.1) is 0"),
    (dict(budget=16, grow_interval=0), "'grow_interval' (--drlora-grow-interval)"),
    (dict(budget=16, rank_pool=True, rank_pool_capacity=0.9),
     "'rank_pool_capacity' (--drlora-rank-pool-capacity): must be a number >= 1"),
    (dict(budget=16, rank_pool=False, rank_pool_capacity=1.1),
     "which --no-drlora-rank-pool turns off"),
    (dict(budget=2, r_init=1, r_max=4, p_grow=0.5, rank_pool=True, rank_pool_capacity=1.1,
          rank_map=[[[2, 2]]]), "a fixed --drlora-rank-map sizes the pool"),
])
def test_bad_values_name_the_field_and_fix(kwargs, needle):
    with pytest.raises(DRLoRAConfigError) as err:
        DRLoRAConfig(**kwargs)
    assert needle in str(err.value)


def test_cap_zero_refused_where_the_schedule_would_never_grow():
    """p_grow = 1/3 with r_max - r_init = 3: a float product gives 1, the schedule's exact
    decimal gives 0; validation must use the schedule's cap and refuse."""
    with pytest.raises(DRLoRAConfigError) as err:
        DRLoRAConfig(budget=4, r_init=2, r_max=5, p_grow=1 / 3)
    for flag in ("--drlora-p-grow", "--drlora-rank-max", "--drlora-rank-init"):
        assert flag in str(err.value)
    assert "is 0" in str(err.value)


def test_targets_in_canonical_order():
    """The paper visits an expert's modules gate, up, down whatever order the user writes."""
    import torch

    from megatron_drlora.allocator import allocate_growth

    assert DRLoRAConfig(budget=16, targets="down,up") == DRLoRAConfig(budget=16, targets="up,down")
    assert DRLoRAConfig(budget=16, targets=("down", "gate", "up")).targets == ("gate", "up", "down")
    parser = add_drlora_args(argparse.ArgumentParser())
    args = parser.parse_args(["--drlora-budget", "16", "--drlora-targets", "down,up"])
    assert config_from_args(args).targets == ("up", "down")
    grown = []
    for spelling in ("down,up", "up,down"):
        cfg = DRLoRAConfig(budget=16, targets=spelling)
        ranks = torch.full((1, 2, len(cfg.targets)), cfg.rank_init, dtype=torch.int64)
        sal = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
        new = allocate_growth(sal, ranks, [1], 1, cfg.rank_max, [64])  # one rank to hand out
        grown.append({name: int(new[0, 0, i]) for i, name in enumerate(cfg.targets)})
    assert grown[0] == grown[1] == {"up": 9, "down": 8}


def test_yaml_round_trip(tmp_path):
    c = DRLoRAConfig(budget=32, r_init=8, targets=("gate", "up", "down"), saliency="frequency")
    path = tmp_path / "drlora.yaml"
    c.to_yaml(str(path))
    assert DRLoRAConfig.from_yaml(str(path)) == c
    nested = tmp_path / "nested.yaml"
    nested.write_text("drlora:\n  budget: 8\n  gamma: 0\n")
    assert DRLoRAConfig.from_yaml(str(nested)).gamma == 0


def test_yaml_errors(tmp_path):
    with pytest.raises(DRLoRAConfigError, match="does not exist"):
        DRLoRAConfig.from_yaml(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("budget: 16\nrank_limit: 3\n")
    with pytest.raises(DRLoRAConfigError, match=r"unknown DR-LoRA setting\(s\) \['rank_limit'\]"):
        DRLoRAConfig.from_yaml(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("budget: [16\n")
    with pytest.raises(DRLoRAConfigError, match="not valid YAML"):
        DRLoRAConfig.from_yaml(str(broken))


def test_cli_flags_generated_from_fields(tmp_path):
    parser = add_drlora_args(argparse.ArgumentParser())
    args = parser.parse_args(["--drlora-budget", "16", "--drlora-rank-init", "4",
                              "--drlora-targets", "gate,up,down", "--drlora-gamma", "0",
                              "--drlora-allocation", "global"])
    assert drlora_flags_given(args)
    c = config_from_args(args)
    assert (c.budget, c.rank_init, c.targets, c.gamma, c.allocation) == \
        (16, 4, ("gate", "up", "down"), 0.0, "global")
    assert not drlora_flags_given(parser.parse_args([]))
    yaml_file = tmp_path / "c.yaml"
    DRLoRAConfig(budget=8, gamma=0.5).to_yaml(str(yaml_file))
    c = config_from_args(parser.parse_args(["--drlora-config", str(yaml_file),
                                            "--drlora-budget", "12"]))
    assert (c.budget, c.gamma) == (12, 0.5)


def test_cli_rejects_unknown_choice():
    parser = add_drlora_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--drlora-saliency", "magic"])
