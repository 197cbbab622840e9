"""The quality benchmark's pure parts (benchmarks/quality_bench): the static frequency map,
LoRA FLOPs and the FLOPs-matched rank, paired t-intervals and verdicts."""

import pytest

from benchmarks.quality_bench import allocation, statistics
from benchmarks.quality_bench.main import QUICK, parse


def test_static_map_spends_exactly_the_budget_in_proportion_capped_at_r_max():
    counts = [[10, 0, 0, 30], [1, 1, 1, 1], [100, 1, 1, 1]]
    ranks = allocation.static_frequency_map(counts, 2, r_init=2, r_target=4, r_max=8)
    assert ranks[0] == [[4, 4], [2, 2], [2, 2], [8, 8]]  # 1:3 of the extra 8 expert-ranks
    assert ranks[1] == [[4, 4]] * 4
    assert ranks[2][0] == [8, 8]  # capped at r_max; the rest shared by the others
    for layer in ranks:
        assert sum(r for e in layer for r in e) == 4 * 2 * 4  # uniform r_target's count
        assert all(2 <= r <= 8 for e in layer for r in e)


def test_flops_ratio_weights_ranks_by_routing_and_matched_rank_rounds_halves_up():
    counts = [[3, 1]]
    widths = [96, 48]  # up (h -> 2 ffn) and down
    assert allocation.flops_ratio_to_uniform([[[4, 4], [4, 4]]], counts, widths, 4) == 1.0
    ratio = allocation.flops_ratio_to_uniform([[[6, 6], [2, 2]]], counts, widths, 4)
    assert ratio == pytest.approx((3 * 6 + 1 * 2) / (4 * 4))
    matched = allocation.flops_matched_rank([1.25, 1.125], 4)
    assert matched["exact"] == pytest.approx(4.75) and matched["rank"] == 5
    assert matched["flops_of_rank_vs_drlora"] == pytest.approx(5 / 4.75)
    assert allocation.flops_matched_rank([1.125], 4)["rank"] == 5  # 4.5 -> 5


def test_paired_t_interval_and_verdicts():
    diff = statistics.paired({0: 0.7, 1: 0.8, 2: 0.75, 3: 0.9}, {0: 0.6, 1: 0.7, 2: 0.7,
                                                                  3: 0.8, 4: 0.1})
    assert diff["seeds"] == [0, 1, 2, 3] and diff["mean"] == pytest.approx(0.0875)
    half = 3.182 * diff["sd"] / 2
    assert (diff["low"], diff["high"]) == pytest.approx((0.0875 - half, 0.0875 + half))
    assert statistics.verdict(diff) == "DR-LoRA better"
    assert statistics.verdict(diff, higher_is_better=False) == "DR-LoRA worse"
    tie = statistics.paired({0: 1.0, 1: 0.0}, {0: 0.0, 1: 1.0})
    assert statistics.verdict(tie).startswith("no detectable difference")
    assert statistics.paired({0: 1.0}, {0: 0.5})["low"] is None
    assert statistics.t975(4) == 2.776 and statistics.t975(35) == 2.042
    se = statistics.prompt_sampling_se({0: "1100", 1: "1000"}, {0: "0100", 1: "0000"})
    assert se == pytest.approx(0.25)  # per prompt: 1, 0, 0, 0 -> sd 0.5 / sqrt(4)


def test_quick_preset_fills_only_what_was_not_given():
    args = parse(["--quick", "--seeds", "2", "--num-experts=16"])
    assert args.seeds == 2 and args.num_experts == 16
    assert args.finetune_iters == QUICK["finetune_iters"] and args.variants[-1] == "drlora"
    with pytest.raises(SystemExit):
        parse(["--variants", "uniform_flops"])  # needs drlora's FLOPs
