"""Launching a test script under torchrun on this machine: N processes, gloo, 127.0.0.1.

``torchrun_command(2, script, *args)`` is the command line (on a free port); ``torchrun_env()`` the
environment: one OpenMP thread per process (the CI machine has 2 cores) and the checkout on
PYTHONPATH, so the workers import this lemon_ext whether or not it is installed.
"""
import os
import pathlib
import socket
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, *script_and_args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, script_and_args)]


def torchrun_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
