"""Internal library shared by the external-backup scripts.

Each module holds one mechanism (the format registry, configuration, the external store, the
streaming upload, subprocess pipelines, encryption and compression stages, manifests, the
retrieval gate, each direction of each backup, output); the scripts in ``scripts/`` are thin
fronts over them. docs/architecture.md draws the layers.

Scripts run without activating anything: when the Python that started one lacks the packages
of requirements.txt and the checkout has a ``.venv`` (README, "Prerequisites"), the script is run
again with that venv's Python.
"""

from __future__ import annotations

import os
import signal
import sys

__version__ = "0.2.0"

_REEXEC = "BACKUPKIT_REEXECUTED"


def _run_with_the_checkouts_venv() -> None:
    # find_spec, not import: importing pyAesCrypt (and its cryptography) costs every script
    # memory and time, and database backups never need it.
    from importlib.util import find_spec

    missing = next((name for name in ("boto3", "pyAesCrypt") if find_spec(name) is None), None)
    if missing is None:
        return
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    venv = os.path.join(checkout, ".venv")
    python = os.path.join(venv, "bin", "python")
    inside = os.path.realpath(sys.prefix) == os.path.realpath(venv)
    if os.path.exists(python) and not inside and not os.environ.get(_REEXEC) and sys.argv and sys.argv[0].endswith(".py"):
        os.environ[_REEXEC] = "1"
        os.execv(python, [python, *sys.argv])  # noqa: S606 - the same script, with the checkout's own Python
    print(f"error: the Python package {missing} is missing: in the checkout run "
          "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt (README, Prerequisites)", file=sys.stderr)
    sys.exit(1)


_run_with_the_checkouts_venv()

# SIGINT and SIGTERM that come while a script of ours is still importing (boto's imports take a
# tenth of a second): remembered here and raised by cli.run (signals.py), so that the run still
# ends with its line instead of a traceback or a silent death.
early_signals: list[int] = []


def _remember(signum: int, frame: object) -> None:
    early_signals.append(signum)


if os.path.dirname(os.path.realpath(getattr(sys.modules.get("__main__"), "__file__", None) or "/")) == \
        os.path.dirname(os.path.dirname(os.path.realpath(__file__))):
    for _signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signal, _remember)
