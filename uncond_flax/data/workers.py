"""Worker processes that do not outlive the training process.

grain's prefetch workers and the decode cache's pool are spawned children. When the trainer dies without
cleaning up (``kill -9``, the OOM killer), they would be re-parented and keep running, holding memory and the
multiprocessing resource tracker's pipe open (so the tracker stays too). A watchdog thread in each worker ends
it once its parent is gone; the tracker then sees its pipe close and exits by itself.

This module must not import JAX: it runs inside the spawned workers.
"""

from __future__ import annotations

import os
import threading

WATCH_INTERVAL_S = 0.5


def _watch(parent_pid: int) -> None:
    stop = threading.Event()
    while not stop.wait(WATCH_INTERVAL_S):
        if os.getppid() != parent_pid:
            os._exit(1)  # no cleanup: the parent that would consume our results is gone


def exit_with_parent(parent_pid: int, *_: object) -> None:
    """Called first thing in a worker: exits the worker soon after ``parent_pid`` (its parent) dies.

    Polls ``getppid`` rather than using Linux's ``PR_SET_PDEATHSIG``: that signal follows the parent *thread*
    that started the process, and grain starts its workers from its own helper threads. Extra positional
    arguments (grain passes the worker index and count) are ignored.
    """
    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), name="uncond_flax-exit-with-parent", daemon=True).start()
