"""A free TCP port on this host for a local rendezvous (torchrun --master_port, MASTER_PORT).

The port is free when asked; another process may take it before it is bound again, which is
acceptable for single-host demos, benchmarks and tests (multi-node jobs get theirs from SLURM).
"""

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
