"""Shared fixtures. Subprocesses (torchrun, the CLI) must import this checkout's clipa_ds."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

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
