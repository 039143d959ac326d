"""SIGINT (Ctrl-C) and SIGTERM (docker stop, systemd) during a run: a clean stop at the next record boundary.

The first signal only marks the run's state (`state.signal`); the pipeline's loop sees it between records and stops,
so the summary counts exactly the records written. A second one raises KeyboardInterrupt: the run stops at once and
its summary is recounted from the files. Once the summary is being written (`state.closing`), and after the second
signal, any further one is ignored, so the summary always gets written.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from adtr_deploy.runtime.runstate import RunState


def catch_signals(state: RunState) -> Callable[[], None]:
    """SIGINT/SIGTERM ask the loop to stop at the next record boundary; a second one raises KeyboardInterrupt; any
    later one, or one while the summary is written, is ignored. Returns the function that restores the previous
    handlers. Only the main thread can set handlers; a SIGINT the process was started ignoring (a backgrounded
    job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    raised = False

    def handler(signum, frame):
        nonlocal raised
        if state.signal is None:
            state.signal = signum
        elif not raised and not state.closing:
            raised = True
            raise KeyboardInterrupt

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
