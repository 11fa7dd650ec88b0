"""How a run stops on SIGINT (Ctrl-C) and SIGTERM (a cancelled job, a scheduler's stop).

The first signal is raised in the main thread (KeyboardInterrupt, or Terminated for SIGTERM), so
every `with` block cleans up on the way out: stages killed, the upload aborted, temporary files
removed. Later signals change nothing: the run is already stopping. A backup's last step
(completing its upload, writing its manifest: a few milliseconds) runs `held()`: a signal then
waits until the step ends, so a completed object is never left without its manifest.

Whatever state the run is in, it ends within EXIT_BOUND seconds of the first signal: waits made
after it are bounded by `time_left()`, a held step's network call is abandoned once its grace has
passed (`finish()`), worker threads are daemons (threads.py), and a watchdog ends the process if
cleanup overruns anyway.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .threads import in_background

T = TypeVar("T")

EXIT_BOUND = 10.0  # seconds from the first signal to the end of the process, at most
CLEANUP_BOUND = EXIT_BOUND - 2  # waits after a signal end by then (aborts, stage kills, pings)
WATCHDOG = EXIT_BOUND - 1  # then the process ends, whatever is still running
LAST_STEP_GRACE = 5.0  # a held step still running this long after the signal is abandoned
# Requests under way when a signal came (upload parts, a files restore's uploads) are waited for
# this long, so that what the run says it left is exact; then they are abandoned.
IN_FLIGHT_WAIT = 3.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
STOPPED_BY = {signal.SIGINT: "interrupted (SIGINT)", signal.SIGTERM: "terminated (SIGTERM)"}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job), raised in the main thread so every `with` block cleans up."""


class _State:
    received: int | None = None  # the first signal
    at = 0.0  # when it came (time.monotonic)
    held = 0  # depth of held() blocks
    pending = False  # came while held: raised when the held block ends
    on_overdue: Callable[[int], None] | None = None


_state = _State()


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum: int, frame: object) -> None:
    if _state.received is not None:
        return  # already stopping: a second signal changes nothing (cleanup is bounded)
    _state.received, _state.at = signum, time.monotonic()
    if _state.on_overdue is not None:
        threading.Thread(target=_watchdog, args=(signum,), name="signal-watchdog", daemon=True).start()
    if _state.held:
        _state.pending = True
        return
    raise _exception(signum)


def _watchdog(signum: int) -> None:
    time.sleep(max(_state.at + WATCHDOG - time.monotonic(), 0))
    if _state.on_overdue is not None:
        _state.on_overdue(signum)


def install(on_overdue: Callable[[int], None] | None = None) -> dict[int, Any]:
    """Take SIGINT and SIGTERM; `on_overdue(signum)` (from the watchdog's thread) must end the
    process when cleanup has not ended WATCHDOG seconds after the first signal. Returns the
    handlers it replaced. A signal that came while the script was importing (backupkit's
    early_signals) is raised by raise_pending()."""
    from . import early_signals

    _state.received, _state.pending, _state.held, _state.on_overdue = None, False, 0, on_overdue
    previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    if early_signals:
        _state.received, _state.at, _state.pending = early_signals[0], time.monotonic(), True
        early_signals.clear()
        if on_overdue is not None:
            threading.Thread(target=_watchdog, args=(_state.received,), name="signal-watchdog", daemon=True).start()
    return previous


def raise_pending() -> None:
    """Raise a signal that came before install(), while the script was importing."""
    if _state.pending and not _state.held:
        _state.pending = False
        raise _exception(_state.received or signal.SIGINT)


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers install() replaced, and forget any signal (for callers in process)."""
    _state.received, _state.pending, _state.held, _state.on_overdue = None, False, 0, None
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def ignore() -> None:
    """The run's outcome is decided (its line printed): from now on a signal changes nothing,
    not even while the interpreter shuts down (Python's own handlers are gone by then)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def time_left(default: float | None = None) -> float | None:
    """How long a wait may last: `default` (None: as long as it takes), or, once a signal came,
    at most what is left until CLEANUP_BOUND seconds after it."""
    if _state.received is None:
        return default
    left = max(_state.at + CLEANUP_BOUND - time.monotonic(), 0.0)
    return left if default is None else min(default, left)


def in_flight_wait() -> float | None:
    """How long to wait for requests under way: as long as they take, or, once a signal came,
    IN_FLIGHT_WAIT seconds at most."""
    return None if _state.received is None else time_left(IN_FLIGHT_WAIT)


@contextmanager
def held() -> Iterator[None]:
    """A step that must not be cut short: a signal during it is raised when it ends (or, via
    finish(), once its grace has passed)."""
    _state.held += 1
    try:
        yield
    finally:
        _state.held -= 1
    if not _state.held and _state.pending:
        _state.pending = False
        raise _exception(_state.received or signal.SIGINT)


def finish(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` (a network call) inside held(): it runs in a daemon thread so that, when a
    signal came and LAST_STEP_GRACE seconds have passed, the run goes on without it (raising the
    signal) instead of waiting for an endpoint that does not answer."""
    future = in_background(fn, *args, name="last-step")
    while not concurrent.futures.wait([future], timeout=0.05).done:
        if _state.pending and time.monotonic() - _state.at > LAST_STEP_GRACE:
            _state.pending = False
            raise _exception(_state.received or signal.SIGINT)
    return future.result()


def wait(future: concurrent.futures.Future[T], default: float | None = None) -> T:
    """The future's result, waited for at most time_left(default) seconds (TimeoutError)."""
    return future.result(timeout=time_left(default))
