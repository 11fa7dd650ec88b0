"""`python tests/with_fake_encryption.py SCRIPT ARGS…`: run scripts/SCRIPT unchanged, with the
test-only encryption `fakecrypt` (tests/fake_encryption.py) in the format registry as the default
of both kinds."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO)]

from tests.fake_encryption import register  # noqa: E402 - after the path is set

if __name__ == "__main__":
    register()
    script = str(REPO / "scripts" / sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
