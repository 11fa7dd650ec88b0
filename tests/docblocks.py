"""The ```bash blocks of a markdown document, with the `<!-- …-test: reason -->` marker that may
stand on the line before one (runbook.md, README.md)."""

from __future__ import annotations

import re
from pathlib import Path

BLOCK_RE = re.compile(r"(?:<!-- (?:runbook|readme)-test: (?P<marker>[^>]*?) -->\n)?```bash\n(?P<body>.*?)```", re.S)


def bash_blocks(path: Path) -> list[tuple[str | None, str]]:
    """(marker or None, body) for every bash block, in document order."""
    return [(m.group("marker"), m.group("body")) for m in BLOCK_RE.finditer(path.read_text())]
