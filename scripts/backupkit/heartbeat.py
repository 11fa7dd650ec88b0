"""Heartbeats to a dead-man's-switch monitor (healthchecks.io's convention, which Cronitor-style
services accept too): `URL/start` when work starts, `URL` on success, `URL/fail` with the error
line as the body on failure. The monitor alerts when a ping is missing or says fail, whatever
happened to GitHub's scheduler, so it catches the backup that did not run at all.

The URL carries the monitor's token: it is a secret, never printed. A ping that fails or times
out is a warning and never changes the script's result.
"""

from __future__ import annotations

import time

from . import signals
from .config import is_http_url
from .errors import UsageError
from .output import log
from .redaction import register_secret
from .threads import in_background

# Seconds per try, for the whole request: a socket timeout alone bounds each read, and a monitor
# that trickles its answer a byte at a time would hold the run as long as it liked. A monitor that
# does not answer costs at most TRIES × this (+ 0.5 s between tries); after a signal, less.
TIMEOUT = 3
TRIES = 2
MAX_BODY = 4096  # the error line, at most this many bytes


class Heartbeat:
    def __init__(self, url: str):
        register_secret(url)
        if not is_http_url(url):
            raise UsageError("BACKUP_HEARTBEAT_URL / --heartbeat-url is not an http(s) URL (not shown: it holds a token)")
        self.url = url.rstrip("/")

    def start(self) -> None:
        self._ping("start", "/start")

    def success(self) -> None:
        self._ping("success", "")

    def fail(self, message: str) -> None:
        self._ping("fail", "/fail", message.encode()[:MAX_BODY])

    def _ping(self, what: str, suffix: str, body: bytes | None = None) -> None:
        problem = ""
        for attempt in range(TRIES):
            limit = signals.time_left(TIMEOUT)
            if not limit:
                problem = problem or "no time left after a signal"
                break
            # In a daemon thread, waited for `limit` seconds in all, then abandoned.
            request = in_background(self._request, suffix, body, limit, name="heartbeat")
            try:
                request.result(timeout=limit)
                return
            except TimeoutError:
                problem = f"no answer within {limit:.0f} s"
            except Exception as exc:  # noqa: BLE001 - refused, unreachable, a garbled answer: never the run's result
                code = getattr(exc, "code", None)
                reason = getattr(exc, "reason", exc)
                problem = (f"the monitor answered {code}" if isinstance(code, int)
                           else type(reason).__name__ if not isinstance(reason, str) else "unreachable")
            if attempt + 1 < TRIES:
                time.sleep(min(0.5, signals.time_left(0.5) or 0))
        log(f"warning: heartbeat {what} ping failed ({problem}); the monitor will alert if pings stay missing. "
            "This run's result is unchanged")

    def _request(self, suffix: str, body: bytes | None, timeout: float) -> None:
        import urllib.request  # here: most runs have no heartbeat, and http.client is not small

        request = urllib.request.Request(  # noqa: S310 - http(s) checked in __init__
            self.url + suffix, data=body, method="POST" if body is not None else "GET",
            headers={"User-Agent": "external-backups-heartbeat"})
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - http(s) checked above
            answer.read(1024)
