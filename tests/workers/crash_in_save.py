"""examples/pretrain_gpt.py with one rank killed (SIGKILL) in the middle of a checkpoint save.

DRLORA_TEST_CRASH="ITER_DIR_NAME:RANK": that rank kills itself right after it has written its
first checkpoint file into ITER_DIR_NAME, while the other ranks are still saving: no metadata,
no tracker update, no Python cleanup, as a node failure mid-save would leave it.
"""

import os
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from megatron_drlora.compat.megatron import prepare_import  # noqa: E402

prepare_import()

from megatron.core.dist_checkpointing.strategies import filesystem_async  # noqa: E402

iter_name, crash_rank = os.environ["DRLORA_TEST_CRASH"].split(":")
writer = filesystem_async.FileSystemWriterAsync
write = writer.write_preloaded_data


def write_then_die(transform_list, **kwargs):
    out = write(transform_list, **kwargs)
    file_name = str(kwargs["write_bucket"][0])
    if iter_name in file_name and os.environ.get("RANK") == crash_rank:
        print(f"crash_in_save: rank {crash_rank} killed after writing {file_name}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return out


writer.write_preloaded_data = staticmethod(write_then_die)
entry = os.path.join(REPO, "examples", "pretrain_gpt.py")
sys.argv = [entry] + sys.argv[1:]
runpy.run_path(entry, run_name="__main__")
