"""What every script shares at its edges: common flags, exit codes, `error:` lines, redaction of
secrets, GitHub Actions annotations and step summaries."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from . import signals
from .errors import BackupError, UsageError
from .heartbeat import Heartbeat
from .output import annotation, annotation_property, log, md_code, safe_lines, shown
from .redaction import redact
from .signals import Terminated

__all__ = ["Terminated"]  # scripts and tests name it cli.Terminated

_interrupt_notes: list[Callable[[], str]] = []


def on_interrupt(note: Callable[[], str]) -> None:
    """What to say of the work done when the script is stopped: `note()` returns what the run
    left behind, or "" for nothing (default: nothing was completed)."""
    _interrupt_notes.append(note)


def _stopped() -> str:
    said = [text for text in (note() for note in _interrupt_notes) if text]
    return "; ".join(said) or "nothing was completed by this run"


def step_summary(markdown: str) -> None:
    """Append to the GitHub Actions job summary, when there is one. Values from outside must be
    in it through output.md_code()."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(redact(markdown).rstrip("\n") + "\n\n")


def _one_line(message: str) -> str:
    """A message as one printable line with every secret redacted."""
    return safe_lines(redact(" ".join(message.split("\n"))))


def warn(message: str) -> None:
    """A warning line on stderr, and a warning annotation under GitHub Actions."""
    message = _one_line(message)
    log(f"warning: {message}")
    if os.environ.get("GITHUB_ACTIONS") == "true":
        print(f"::warning::{annotation(message)}", file=sys.stderr, flush=True)


_heartbeat: Heartbeat | None = None
_standalone = False  # run() is the script's own (not called in process by a test)
_debug = False  # --debug: a traceback with an unexpected failure


def add_heartbeat_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heartbeat-url", default=os.environ.get("BACKUP_HEARTBEAT_URL") or None, metavar="URL",
                   help="ping a dead-man's-switch monitor (healthchecks.io style): URL/start, then URL on success or "
                        "URL/fail with the error line (env BACKUP_HEARTBEAT_URL; a secret: never printed)")


def parse_args(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv (a usage error is one `error:` line and exit 2); --debug takes effect now."""
    global _debug
    args = p.parse_args(argv)
    _debug = bool(getattr(args, "debug", False))
    return args


def start(args: argparse.Namespace) -> None:
    """The work starts: with a heartbeat URL (--heartbeat-url), ping its start now; `run` then
    pings its success or failure."""
    global _heartbeat
    url = getattr(args, "heartbeat_url", None)
    if url:
        _heartbeat = Heartbeat(url)
        _heartbeat.start()


# Held while the error line is written: the signal watchdog writes it only if nobody did.
_line_lock = threading.Lock()
_line_written = False


def _write_error_line(message: str, script: str, patience: float = -1) -> None:
    global _line_written
    if not _line_lock.acquire(timeout=patience):
        return
    try:
        if _line_written:
            return
        print(f"error: {message}", file=sys.stderr, flush=True)
        if os.environ.get("GITHUB_ACTIONS") == "true":
            print(f"::error title={annotation_property(script)}::{annotation(message)}", file=sys.stderr, flush=True)
            step_summary(f"### {script}: failed\n\n{md_code(message, already_shown=True)}")
        error_file = os.environ.get("BACKUP_ERROR_FILE")
        if error_file:
            try:
                with open(error_file, "a", encoding="utf-8") as handle:
                    handle.write(f"{script}: {message}\n")
            except OSError as exc:
                log(f"warning: could not write BACKUP_ERROR_FILE ({exc.strerror})")
        _line_written = True
    finally:
        _line_lock.release()


def fail(message: str, code: int, script: str) -> NoReturn:
    if _standalone:
        signals.ignore()  # this line is the outcome: a signal now must not cut it short
    message = _one_line(message)
    _write_error_line(message, script)
    if _heartbeat is not None:  # last: the error line is out whatever the monitor does
        _heartbeat.fail(f"{script}: {message}")  # message is redacted already
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line (plus usage) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        fail(message, 2, self.prog)


def parser(prog: str, description: str, epilog: str | None = None) -> ArgumentParser:
    return ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--environment", default=os.environ.get("BACKUP_ENVIRONMENT"),
                   help="environment folder in the bucket, e.g. production (env BACKUP_ENVIRONMENT)")
    p.add_argument("--bucket", default=os.environ.get("BACKUP_BUCKET"),
                   help="the external backup bucket (env BACKUP_BUCKET)")


def add_backup_choice(p: argparse.ArgumentParser, latest_help: str = "the newest backup that verifies") -> argparse._MutuallyExclusiveGroup:
    """--latest | --key (plus --version-id); the returned group takes a script's other choices."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--latest", action="store_true", help=latest_help)
    which.add_argument("--key", help="a backup's key (or its file name), as list_backups.py shows it")
    p.add_argument("--version-id", help="with --key: which version; required when the key has more than one "
                                        "(two backups in one second, or one a writer added)")
    return which


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result on stdout as JSON")
    p.add_argument("--debug", action="store_true", help="print a traceback on unexpected errors")


def print_result(result: Any, as_json: bool, human: str) -> None:
    """The result on stdout: JSON (which escapes every control character itself), or the human
    text, whose values from outside went through output.shown()."""
    text = json.dumps(result, indent=2, default=str).replace("##[", "#\\u0023[") if as_json else safe_lines(human)
    try:
        print(redact(text), flush=True)
    except BrokenPipeError:
        # The reader (e.g. `| head`) left: the work is done, only the rest of the output is lost.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _overdue(signum: int, script: str) -> None:
    """The signal watchdog (its own thread): cleanup overran, so the process ends now, with the
    error line written if it was not yet."""
    code = signals.EXIT_CODES[signum]
    try:
        _write_error_line(_one_line(f"{signals.STOPPED_BY[signum]}: stopped; cleanup did not end within "
                                    f"{signals.WATCHDOG:.0f} s and was cut short; {_stopped()}"), script, patience=0.5)
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(code)


def run(main: Callable[[list[str]], int], argv: list[str] | None = None) -> NoReturn:
    """Run a script's main(argv) and turn what it raises into an exit status and one line.

    SIGINT and SIGTERM stop the run (signals.py) and the line says what it left behind
    (on_interrupt). Once the outcome is decided a signal changes nothing, and the process ends
    within signals.EXIT_BOUND seconds of the first one. With `argv` given (called in process, by a
    test) the caller's signal handlers are put back on the way out."""
    global _standalone
    in_process = argv is not None
    _standalone = not in_process
    argv = sys.argv[1:] if argv is None else argv
    script = os.path.basename(sys.argv[0] or "script")
    previous = signals.install(on_overdue=None if in_process else lambda signum: _overdue(signum, script))
    try:
        try:
            signals.raise_pending()
            code = main(argv)
        except UsageError as exc:
            fail(str(exc), 2, script)
        except BackupError as exc:
            fail(str(exc), 1, script)
        except KeyboardInterrupt as exc:
            signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
            fail(f"{signals.STOPPED_BY[signum]}: stopped; {_stopped()}", signals.EXIT_CODES[signum], script)
        except OSError as exc:
            if _debug:
                print(redact(traceback.format_exc()), file=sys.stderr)
            where = f": {shown(exc.filename)}" if exc.filename else ""
            fail(f"{exc.strerror or type(exc).__name__}{where}", 1, script)
        except Exception as exc:  # noqa: BLE001 - last resort: one line, never a traceback by default
            if _debug:
                print(redact(traceback.format_exc()), file=sys.stderr)
            fail(f"unexpected failure: {type(exc).__name__}: {exc} (run with --debug for a traceback)", 1, script)
        if _standalone:
            signals.ignore()  # the result is printed: a signal now changes nothing
        if _heartbeat is not None and code == 0:
            _heartbeat.success()
        elif _heartbeat is not None:
            _heartbeat.fail(f"{script}: exit status {code}")
        sys.exit(code)
    finally:
        if in_process:
            signals.restore(previous)
