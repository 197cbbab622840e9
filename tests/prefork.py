"""torchrun's job for the test suite, without paying Python's start-up for every launch.

Most of a tiny multi-process run's cost on a 2-core box is importing torch and Megatron in
every rank of every launch (about 6 s of a 12 s one-process run). This module keeps one
server process per test process that has imported them once; a launch forks it, and the
forked launcher forks one process per rank, which runs the script exactly as torchrun's
workers would: `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` in the
environment, `sys.argv` set, the script run as `__main__`. Like torchrun, when one rank fails
the others are stopped (SIGTERM, then SIGKILL). Output goes to files, not pipes; the launcher
and its ranks form one session the client kills on timeout or when they are done, so nothing
outlives a launch.

What this does not replace: torchrun's agent itself (rendezvous across nodes, signal
forwarding, restarts). Tests of those (tests/test_multinode.py, the SLURM scripts, the demo,
the Mixtral example script) launch real torchrun.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SERVER = None  # (process, socket path) of this test process's server


# --- client (the test process) --------------------------------------------------------------
def _server():
    global _SERVER
    if _SERVER is None or _SERVER[0].poll() is not None:
        path = os.path.join(tempfile.mkdtemp(prefix="prefork"), "sock")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep +
                   os.environ.get("PYTHONPATH", ""))
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)  # the pytest process may have set them for itself
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), path],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                cwd=REPO, text=True)
        ready = proc.stdout.readline()
        if ready.strip() != "READY":
            raise RuntimeError(f"prefork server did not start: {ready!r}")
        _SERVER = (proc, path)
    return _SERVER[1]


def launch(script, args, nproc, timeout, env=None, cwd=REPO, master_port=None):
    """Run `script args` in `nproc` ranks; returns a CompletedProcess (stdout, stderr text,
    returncode: the first failing rank's, -9 on timeout)."""
    from megatron_drlora.launch.ports import free_port

    env = dict(os.environ, **(env or {}))
    env.setdefault("OMP_NUM_THREADS", "1")
    paths = []
    for _ in range(2):  # stdout, stderr: files the ranks append to
        fd, path = tempfile.mkstemp(prefix="prefork")
        os.close(fd)
        paths.append(path)
    request = {"script": str(script), "args": [str(a) for a in args], "nproc": int(nproc),
               "env": env, "cwd": str(cwd), "out": paths[0], "err": paths[1],
               "master_port": int(master_port or free_port())}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(_server())
    launcher = None
    try:
        conn.sendall((json.dumps(request) + "\n").encode())
        reader = conn.makefile("r")
        launcher = int(reader.readline())
        conn.settimeout(timeout)
        try:
            line = reader.readline()
            code = int(line) if line.strip() else -9
        except (socket.timeout, TimeoutError):
            code = -9
    finally:
        conn.close()
        if launcher is not None:
            try:
                os.killpg(launcher, signal.SIGKILL)  # leftovers (timeouts, orphaned helpers)
            except (ProcessLookupError, PermissionError):
                pass
    text = [open(p).read() for p in paths]
    for p in paths:
        os.unlink(p)
    if code == -9:
        text[1] += f"\n[prefork] killed after the {timeout} s timeout\n"
    return subprocess.CompletedProcess([script] + list(args), code, text[0], text[1])


# --- server --------------------------------------------------------------------------------
def _preload():
    """What examples/pretrain_gpt.py and the test workers import (the costly part)."""
    sys.path.insert(0, REPO)
    from megatron_drlora.compat.megatron import prepare_import

    prepare_import()
    import warnings

    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core  # noqa: F401
        import megatron.core.dist_checkpointing  # noqa: F401

        # only what this environment has (megatron-core without megatron.training, no
        # matplotlib): a rank imports whatever was not preloaded itself
        # (megatron.core.tokenizers.text: Megatron-LM builds every tokenizer through it, and
        # it imports transformers, 2 s)
        for name in ("megatron.training.training", "megatron_drlora.megatron_lm.model_provider",
                     "megatron_drlora.megatron_lm.setup", "megatron.core.tokenizers.text",
                     "megatron_drlora.plotting", "matplotlib"):
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        if "matplotlib" in sys.modules:  # the rank heatmaps are drawn headless
            sys.modules["matplotlib"].use("Agg")
            import matplotlib.pyplot  # noqa: F401
        _memoize_argument_docs()


def _memoize_argument_docs():
    """Megatron-LM builds its argument parser (twice a launch) from the docstrings of its
    config dataclasses' fields, read from their source (inspect + ast: about 0.8 s a launch).
    They are a function of the class alone: the server reads them once, before forking."""
    try:
        import argparse

        from megatron.training import argument_utils, arguments
    except ImportError:
        return
    factory = getattr(argument_utils, "ArgumentGroupFactory", None)
    read = getattr(factory, "_get_field_docstrings", None)
    if read is None:
        return
    known = {}

    def field_docstrings(self, src_cfg_class):
        if src_cfg_class not in known:
            known[src_cfg_class] = read(self, src_cfg_class)
        return dict(known[src_cfg_class])

    factory._get_field_docstrings = field_docstrings
    arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))


def _run_rank(request, rank):
    """In a forked rank: torchrun's environment, output to the files, the script as
    __main__. Never returns."""
    import runpy
    import warnings

    code = 1
    try:
        for fd, path in ((1, request["out"]), (2, request["err"])):
            target = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.dup2(target, fd)
            os.close(target)
        os.environ.clear()
        os.environ.update(request["env"])
        nproc = request["nproc"]
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                          LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", ROLE_RANK=str(rank),
                          ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(request["master_port"]))
        if request["env"].get("PYTHONWARNINGS") == "ignore":
            warnings.simplefilter("ignore")
        sys.argv = [request["script"]] + request["args"]
        sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))
        runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001  (reported like torchrun's worker)
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _launch(conn):
    """In a forked launcher (its own session): fork the ranks, wait, stop the others when one
    fails, report the exit code. Never returns."""
    request = json.loads(conn.makefile("r").readline())
    conn.sendall(f"{os.getpid()}\n".encode())
    os.chdir(request["cwd"])
    ranks = []
    for rank in range(request["nproc"]):
        pid = os.fork()
        if pid == 0:
            conn.close()
            _run_rank(request, rank)
        ranks.append(pid)
    code, running, deadline = 0, set(ranks), None
    while running:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if deadline is not None and time.time() > deadline:
                for p in running:
                    os.kill(p, signal.SIGKILL)
                deadline = None
            time.sleep(0.02)
            continue
        if pid not in running:
            continue
        running.discard(pid)
        rc = os.waitstatus_to_exitcode(status)
        if rc != 0 and code == 0:
            code = rc
            for p in running:
                os.kill(p, signal.SIGTERM)
            deadline = time.time() + 10
    try:
        conn.sendall(f"{code}\n".encode())
    finally:
        os._exit(0)


def serve(path):
    _preload()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # launchers are reaped by the kernel
    print("READY", flush=True)
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.setsid()
            _launch(conn)
        conn.close()


if __name__ == "__main__":
    import threading

    # the server ends with the test process (its stdin closes)
    threading.Thread(target=lambda: (os.read(0, 1), os._exit(0)), daemon=True).start()
    serve(sys.argv[1])
