"""Shared pytest setup: one single-process Megatron-Core (gloo) for in-process tests.

Multi-process tests never use this: they spawn their own processes (tests/dist_harness.py).
"""

import os
import warnings

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

from megatron_drlora.compat.megatron import prepare_import  # noqa: E402

prepare_import()  # before any test module imports megatron (Python 3.11, no triton)

from megatron_drlora.launch.ports import free_port  # noqa: E402,F401  (tests import it here)


@pytest.fixture(scope="session")
def megatron_single():
    """Megatron-Core initialised with world size 1 (TP=PP=EP=1) in this process."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    os.environ["RANK"] = "0"
    os.environ["WORLD_SIZE"] = "1"
    from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel

    initialize_megatron_parallel(ParallelSizes(), seed=1234)
    yield


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    """One folder for the examples/pretrain_gpt.py runs shared across test modules."""
    return tmp_path_factory.mktemp("megatron_runs")


@pytest.fixture(scope="session")
def base(work):
    """The tiny base of tests/train_flags.py, trained once by the entry without DR-LoRA."""
    from tests.megatron_runs import make_base

    return make_base(work / "base")
