"""How DataLoader worker processes start: forked from a single-threaded fork server, never from
the training process itself.

By the time a loader starts, the training process runs native threads (gloo, DeepSpeed, torch's
autograd and queue feeders) that take CPython's thread-state lock. On Python 3.11 a fork taken
while another thread holds that lock leaves the child blocked forever inside os.fork(). We hit
it on CI: an in-loop evaluation's worker never started, so its rank never reached the next
all_reduce and the whole job hung. The fork server is a fresh interpreter with no such
threads; it imports the data modules once (PRELOAD), so starting a worker stays a cheap fork.

Environment: a worker gets the environment its loader was built in (S3 credentials set after
the server started included), as it would after a fork.

Signals: the server is started with the stop signals (SIGTERM, SIGUSR1) blocked, a mask that
it and every worker it forks inherit. A pre-emption signal sent to the whole process group then
leaves the workers alive until the main process has saved its checkpoint (torch would otherwise
let them die, and the main process would fail on its next fetch).

Ending: workers end with their loader, and when the main process dies, however it dies (each
watches it through a pidfd; the server exits once its last worker has gone). At interpreter
exit, multiprocessing would SIGTERM its daemonic children and then wait for them forever, so an
exit with a loader still open (an error mid-epoch) kills the workers first.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.util
import os
import select
import signal
import threading
import time
from multiprocessing import forkserver, resource_tracker
from multiprocessing.context import BaseContext
from typing import Any

from clipa_ds.checkpoint_trigger import STOP_SIGNALS

PRELOAD = ["torch", "clipa_ds.data.pipeline", "clipa_ds.evaluate.datasets"]


def _kill_workers_at_exit() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:  # DataLoader workers are daemonic
            child.kill()


# atexit runs last-registered first, and multiprocessing.util (imported above) registered its
# terminate-and-join already: this runs before it.
atexit.register(_kill_workers_at_exit)


def worker_options(workers: int) -> dict[str, Any]:
    """DataLoader keyword arguments that start its `workers` processes safely (see above)."""
    if workers == 0:
        return {}
    return {
        "multiprocessing_context": worker_context(),
        "worker_init_fn": functools.partial(_init_worker, dict(os.environ), os.getpid()),
    }


def _init_worker(environment: dict[str, str], owner_pid: int, worker_id: int) -> None:
    os.environ.clear()
    os.environ.update(environment)
    threading.Thread(target=_exit_with_owner, args=(owner_pid,), name="clipa-owner-watch", daemon=True).start()


def _exit_with_owner(owner_pid: int) -> None:
    """End this worker when the process that owns its loader is gone (SIGKILL, OOM kill).

    torch's own check watches the parent, which here is the fork server; and the server lives
    while any worker holds its liveness pipe, so without this both would outlive a killed rank."""
    try:
        owner = os.pidfd_open(owner_pid)
    except ProcessLookupError:
        os._exit(1)
    except OSError:  # no pidfd (kernel < 5.3): poll
        while _alive(owner_pid):
            time.sleep(5.0)
        os._exit(1)
    select.select([owner], [], [])  # readable once the owner has exited
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_context() -> BaseContext:
    """The fork-server context, its server started with the stop signals blocked."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    # The fork server first starts the resource tracker, which unblocks SIGTERM on its way out;
    # start it ourselves, then put back the caller's mask.
    caller_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        forkserver.ensure_running()  # no-op once started; the server inherits this mask
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, caller_mask)
    return context
