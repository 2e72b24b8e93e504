"""Shared fixtures. Subprocesses (torchrun, the CLI) must import this checkout's clipa_ds."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from typing import Any, Callable

import pytest

pytest_plugins = ["tests.s3_server"]

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


def _rank_main(worker: Callable[..., None], rank: int, port: int, queue: Any, exit_barrier: Any) -> None:
    worker(rank, port, queue)
    # Rank 0 hosts the TCPStore: if it exits while a peer is still inside destroy_process_group,
    # that peer's gloo threads can abort (SIGABRT, seen on CI). Nobody leaves until all are done.
    exit_barrier.wait(timeout=300)


def run_ranks(worker: Callable[..., None], world: int, messages: int, timeout: float = 600) -> list[Any]:
    """Spawn `world` processes running worker(rank, port, queue); collect `messages` queue items.

    Workers join a gloo group on 127.0.0.1:port, put picklable results (numpy, not shared
    tensors) on the queue and destroy their group. Every process must exit cleanly.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, exit_barrier = ctx.Queue(), ctx.Barrier(world)
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(worker, rank, port, queue, exit_barrier)) for rank in range(world)]
    for proc in procs:
        proc.start()
    try:
        items = [queue.get(timeout=timeout) for _ in range(messages)]
    finally:
        for proc in procs:
            proc.join(timeout=300)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    return items
