"""The README's commands, run as a newcomer would paste them (blocks that install system packages
or would run this very test suite are skipped, and counted)."""

from __future__ import annotations

import subprocess

from dev.harness import REPO
from tests.conftest import base_env
from tests.docblocks import bash_blocks

ALLOWED_SKIPS = {"this is the command that runs this test", "installs system packages (.ci/run does this)"}


def test_readme_commands_run(s3server):
    found = bash_blocks(REPO / "README.md")
    assert {marker for marker, _ in found if marker} <= ALLOWED_SKIPS
    env = {**base_env(), **s3server.env(), "BACKUP_ALLOW_PLAIN_HTTP": "1"}
    env.pop("PYTHONPATH")
    ran = 0
    for marker, body in found:
        if marker:
            continue
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"README block failed:\n{body}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        ran += 1
        if "make demo" in body:
            assert "== OK: demo finished" in done.stdout
        if "--check" in body:
            assert "PASS" in done.stdout and "FAIL" not in done.stdout
    skipped = sum(1 for marker, _ in found if marker)
    print(f"\nran {ran} README blocks, skipped {skipped}: {sorted({m for m, _ in found if m})}")
    assert ran >= 2


def test_links_resolve_inside_the_repository():
    """Every relative link of the README and the docs names a file of this repository: a clone
    must not point at anything outside it."""
    import re

    documents = [REPO / "README.md", REPO / "runbook.md", *sorted((REPO / "docs").glob("*.md"))]
    checked = 0
    for document in documents:
        for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            path = (document.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(REPO) and path.exists(), f"{document.name}: link to {target} does not resolve in the repository"
            checked += 1
    assert checked >= 4
