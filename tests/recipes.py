"""The paper's recipe files (examples/recipes/*.args) at tiny size, for the tests that run them.

A recipe's flags with only what a tiny CPU run must replace: the sizes (from the converted tiny
model's model.args), the layout, the run's length and batch, the data, and what CPU cannot run
(grouped GEMM needs Transformer Engine; the tests run in fp32)."""

import os
import shlex

from tests.dist_harness import REPO


def tiny_recipe_argv(recipe, base, replace):
    from tests.test_hf_import import LAYOUT_FLAGS, SIZE_FLAGS, _flags

    tiny = _flags(open(os.path.join(base, "model.args")).read().splitlines())
    argv = []
    for line in open(recipe).read().splitlines():
        argv += shlex.split(line.split("#", 1)[0])
    recipe_flags = _flags([shlex.join(argv)])
    drop = set(SIZE_FLAGS) | set(LAYOUT_FLAGS) | set(replace) | {
        "--moe-grouped-gemm", "--bf16", "--lr-warmup-fraction"}
    keep = {f: v for f, v in recipe_flags.items() if f not in drop}
    sizes = {f: v for f, v in tiny.items() if f in SIZE_FLAGS}
    out = []
    for flag, values in {**keep, **sizes, **replace}.items():
        out += [flag] + (values if isinstance(values, list) else [values])
    return out


def training_argv(recipe, base, ckpt, hf_dir, seq, nproc, data=None):
    """examples/pretrain_gpt.py flags: the recipe on `data` (a --data-path prefix; mock data
    without) for 8 iterations with growth at 2, 4, 6 (r_init, r_max and the other DR-LoRA
    settings stay the recipe's) on `nproc` processes (EP = nproc)."""
    replace = {"--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "1",
               "--expert-model-parallel-size": str(nproc), "--expert-tensor-parallel-size": "1",
               "--seq-length": str(seq), "--micro-batch-size": "2", "--global-batch-size": "8",
               "--train-iters": "8", "--lr-warmup-iters": "2", "--drlora-grow-interval": "2",
               "--drlora-grow-buffer": "1", "--tokenizer-model": hf_dir, "--eval-iters": "0",
               "--log-interval": "1", "--save-interval": "4", "--lr": "1e-3",
               "--pretrained-checkpoint": base, "--save": ckpt, "--load": ckpt}
    replace.update({"--data-path": [data], "--split": ["100,0,0"]} if data else
                   {"--data-path": [], "--split": [], "--mock-data": []})
    return ["@" + str(REPO / "examples" / "cpu.args")] + [
        a for a in tiny_recipe_argv(recipe, base, replace)
        if data or a not in ("--data-path", "--split")]


def same_values(a, b) -> bool:
    """Flag values equal as numbers where they are numbers (`1e-5` == `1e-05`), else as text."""
    if a is None or len(a) != len(b):
        return False
    try:
        return [float(x) for x in a] == [float(x) for x in b]
    except ValueError:
        return a == b


def assert_recipe_fits_converter(recipe, converter, architecture_flags, same=same_values):
    """Every flag the converter writes has the recipe's value, and the recipe sets no
    architecture flag the converter does not write (a recipe that would not load the base)."""
    for flag, value in converter.items():
        assert same(recipe.get(flag), value), f"recipe {flag} {recipe.get(flag)} != {value}"
    extra = sorted(f for f in recipe if f in architecture_flags and f not in converter)
    assert not extra, f"the recipe sets {extra}, which the converter does not write"
