"""tools/plan_drlora_schedule.py from the repo root: its main() for each case, and the script
itself in a subprocess (test_imports_no_megatron)."""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join("tools", "plan_drlora_schedule.py")
OLMOE = ["--num-layers", "16", "--num-experts", "64", "--drlora-budget", "64",
         "--drlora-rank-init", "32", "--drlora-rank-max", "128", "--train-iters", "38000",
         "--lr-warmup-iters", "1140"]
TABLE_10 = {0: (0, 65536, 32.00), 6000: (25, 74736, 36.49), 12000: (55, 85776, 41.88),
            18000: (85, 96816, 47.27), 24000: (115, 107856, 52.66),
            30000: (145, 118896, 58.05), 37800: (184, 131072, 64.00)}


def _tool():
    spec = importlib.util.spec_from_file_location("plan_drlora_schedule",
                                                  os.path.join(ROOT, TOOL))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TOOL = _tool()


def run_tool(*args):
    """The tool's main() from the repo root, in this process (one import for all cases; the
    script itself runs in a subprocess in test_imports_no_megatron)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = _TOOL.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess([TOOL, *args], code or 0, out.getvalue(),
                                       err.getvalue())


def test_json_reproduces_table_10():
    proc = run_tool(*OLMOE, "--json", "--at", *map(str, TABLE_10))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["quota"] == [23] * 16 and plan["cap"] == 9
    assert (plan["t_warmup"], plan["t_end"], plan["n_events"]) == (1140, 37800, 183)
    assert plan["event_steps"] == list(range(1140, 37741, 200))
    assert plan["target_reached_event"] == 179 and plan["target_reached_step"] == 36740
    assert plan["target_total_ranks"] == 131072
    rows = {r["step"]: r for r in plan["trajectory"]}
    assert sorted(rows) == sorted(TABLE_10)
    for step, (events, total, avg) in TABLE_10.items():
        assert rows[step]["events"] == events
        assert rows[step]["total_active_ranks"] == total
        assert round(rows[step]["average_rank"], 2) == avg


def test_human_output_and_warmup_fraction():
    proc = run_tool(*OLMOE[:-2], "--lr-warmup-fraction", "0.03")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("t_warmup 1140", "t_end 37800", "T_events 183", "184 events", "quota       23",
                 "cap         9", "reached at event 179", "131,072"):
        assert text in out, out
    assert "         0       0              65,536         32.00" in out


def test_warmup_fraction_of_lr_decay_iters():
    """Megatron's rule: the fraction applies to --lr-decay-iters when given, and is floored."""
    proc = run_tool(*OLMOE[:-2], "--lr-warmup-fraction", "0.03", "--lr-decay-iters", "30000",
                    "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["t_warmup"] == 900
    proc = run_tool(*OLMOE[:-4], "--train-iters", "37950", "--lr-warmup-fraction", "0.03", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["t_warmup"] == 1138  # 1138.5


def test_budget_shortfall_reported():
    args = ["--num-layers", "2", "--num-experts", "1", "--drlora-budget", "16",
            "--drlora-rank-init", "1", "--drlora-rank-max", "16", "--drlora-grow-interval", "10",
            "--drlora-grow-buffer", "0", "--train-iters", "25", "--lr-warmup-iters", "10"]
    proc = run_tool(*args)
    assert proc.returncode == 0, proc.stderr
    assert "52 module-ranks short" in proc.stdout and "--drlora-p-grow" in proc.stdout
    plan = json.loads(run_tool(*args, "--json").stdout)
    assert "52 module-ranks short" in plan["budget_shortfall"]
    assert json.loads(run_tool(*OLMOE, "--json").stdout)["budget_shortfall"] is None


def test_uniform_method_runs():
    proc = run_tool("--num-layers", "2", "--num-experts", "4", "--drlora-budget", "8",
                    "--drlora-method", "uniform", "--train-iters", "100", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["event_steps"] == [] and plan["quota"] == [0, 0]
    assert {r["total_active_ranks"] for r in plan["trajectory"]} == {2 * 8 * 8}


@pytest.mark.parametrize("args,message", [
    (["--train-iters", "600"], "--drlora-grow-interval"),
    (["--train-iters", "500"], "--lr-warmup-iters"),
    (["--train-iters", "38000", "--at", "38000"], "--at"),
    (["--train-iters", "38000", "--drlora-rank-init", "80"], "--drlora-rank-init"),
    (["--train-iters", "0"], "--train-iters"),
])
def test_bad_input_exits_2_with_message(args, message):
    base = ["--num-layers", "16", "--num-experts", "64", "--drlora-budget", "64",
            "--lr-warmup-iters", "300"]
    proc = run_tool(*base, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "error" in proc.stderr
    assert proc.stdout == ""


def test_conflicting_warmup_flags_exit_2():
    proc = run_tool(*OLMOE, "--lr-warmup-fraction", "0.03")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr


def test_imports_no_megatron():
    """The tool must work on a laptop without Megatron: it may import only pure modules."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['plan', *{OLMOE!r}, '--json']\n"
        "try:\n"
        f"    runpy.run_path({TOOL!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "bad = sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_plans_from_a_recipe_file(tmp_path):
    """@flags file: the OLMoE recipe plans Table 10's run; Megatron flags the plan does not use
    are skipped, a misspelt DR-LoRA flag is not."""
    recipe = "@" + os.path.join("examples", "recipes", "olmoe_1b_7b_drlora.args")
    proc = run_tool(recipe, "--json", "--at", *map(str, TABLE_10))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert (plan["t_warmup"], plan["t_end"], plan["n_events"]) == (1140, 37800, 183)
    rows = {r["step"]: r for r in plan["trajectory"]}
    assert rows[37800]["total_active_ranks"] == 131072
    typo = tmp_path / "typo.args"
    typo.write_text(open(os.path.join(ROOT, recipe[1:])).read() + "\n--drlora-grow-intervall 5\n")
    proc = run_tool("@" + str(typo))
    assert proc.returncode == 2 and "--drlora-grow-intervall" in proc.stderr
