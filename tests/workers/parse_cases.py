"""Run the training entry's argument parsing (examples/pretrain_gpt.py's `setup.parse_args`,
everything it does before `pretrain`) on several command lines with one start-up:
`python parse_cases.py CASES.json OUT.json`, CASES a list of argument lists. Each case runs in
a process forked after the imports (Megatron-LM keeps global state per process); writes, per
case, the exit code and what was printed."""

import contextlib
import io
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from megatron_drlora.compat.megatron import prepare_import  # noqa: E402

prepare_import()

from megatron_drlora.megatron_lm import setup  # noqa: E402

# what setup.parse_args imports, once, before the forks
import megatron.training.argument_utils  # noqa: E402,F401
import megatron.training.arguments  # noqa: E402,F401
import megatron.training.global_vars  # noqa: E402,F401
import megatron_drlora.megatron_lm.arguments  # noqa: E402,F401
import megatron_drlora.megatron_lm.run  # noqa: E402,F401


def _parse(argv, result_path):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [os.path.join(REPO, "examples", "pretrain_gpt.py")] + argv
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            setup.parse_args()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    with open(result_path, "w") as fh:
        json.dump({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}, fh)


def run_case(argv, result_path):
    pid = os.fork()
    if pid == 0:
        try:
            _parse(argv, result_path)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return json.load(open(result_path))


if __name__ == "__main__":
    cases_file, out_file = sys.argv[1:3]
    results = [run_case(argv, f"{out_file}.{i}") for i, argv in
               enumerate(json.load(open(cases_file)))]
    json.dump(results, open(out_file, "w"))
