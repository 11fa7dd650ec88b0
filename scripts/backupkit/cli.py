"""What every script shares at its edges: common flags, exit codes, `error:` lines, redaction of
secrets, GitHub Actions annotations and step summaries."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote, urlsplit

from .config import SECRET_VARS
from .errors import BackupError, UsageError


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job), raised in the main thread so every `with` block cleans up."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def secrets_in_environment() -> list[str]:
    found = []
    for name in SECRET_VARS:
        value = os.environ.get(name)
        if not value:
            continue
        if name.endswith("DATABASE_URL"):
            try:
                parts = urlsplit(value)
                password = parts.password
            except ValueError:
                parts = password = None
            if password:
                found += [password, unquote(password)]
            if parts is not None:
                found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k == "password"]
            if parts is not None and "://" in value:
                # A URL's secret is its password: redacting the whole URL would also blank out
                # e.g. 'postgresql://' in "expected postgresql://USER:PASSWORD@…".
                continue
        elif name.endswith("_PREVIOUS"):
            found += [v for v in value.split(",") if v]
        found.append(value)
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def redact(text: str) -> str:
    for secret in secrets_in_environment():
        text = text.replace(secret, "***")
    return text


def step_summary(markdown: str) -> None:
    """Append to the GitHub Actions job summary, when there is one."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(redact(markdown).rstrip("\n") + "\n\n")


def fail(message: str, code: int, script: str) -> NoReturn:
    message = redact(" ".join(message.split("\n")))
    print(f"error: {message}", file=sys.stderr, flush=True)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        print(f"::error title={script}::{message}", file=sys.stderr, flush=True)
        step_summary(f"### {script}: failed\n\n{message}")
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
    p.add_argument("--version-id", help="with --key: one version, when two backups share a second")
    return which


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result on stdout as JSON")
    p.add_argument("--debug", action="store_true", help="print a traceback on unexpected errors")


def print_result(result: Any, as_json: bool, human: str) -> None:
    try:
        print(json.dumps(result, indent=2, default=str) if as_json else human, flush=True)
    except BrokenPipeError:
        # The reader (e.g. `| head`) left: the work is done, only the rest of the output is lost.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run(main: Callable[[list[str]], int], argv: list[str] | None = None) -> NoReturn:
    """Run a script's main(argv) and turn what it raises into an exit status and one line."""
    argv = sys.argv[1:] if argv is None else argv
    script = os.path.basename(sys.argv[0] or "script")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = main(argv)
    except UsageError as exc:
        fail(str(exc), 2, script)
    except BackupError as exc:
        fail(str(exc), 1, script)
    except Terminated:
        fail("terminated (SIGTERM): stopped; nothing was completed by this run", 143, script)
    except KeyboardInterrupt:
        fail("interrupted (SIGINT): stopped; nothing was completed by this run", 130, script)
    except Exception as exc:  # noqa: BLE001 - last resort: one line, never a traceback by default
        if "--debug" in argv:
            print(redact(traceback.format_exc()), file=sys.stderr)
        fail(f"unexpected failure: {type(exc).__name__}: {exc} (run with --debug for a traceback)", 1, script)
    sys.exit(code)
