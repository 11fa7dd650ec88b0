"""Printing what others wrote. Object keys, manifest fields, ZIP member names and server messages
come from less-trusted writers; a terminal acts on escape sequences, and the GitHub Actions runner
acts on `::command::` lines (after leading blanks) and on `##[command]` anywhere in a line, splits
lines at `\\r`, and renders step summaries as Markdown. Every such string goes through `shown()`
(a log or result line), `annotation()` (a workflow command's value) or `md_code()` (a summary).
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

# C0 and C1 controls, DEL, and the Unicode characters that break or reorder lines on display.
_UNSAFE = "\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
_UNSAFE_RE = re.compile(f"[{_UNSAFE}]")
_UNSAFE_OR_BACKSLASH_RE = re.compile(f"[{_UNSAFE}\\\\]")
_COMMAND_AT_START = re.compile(r"^(\s*):(?=:)")
_LEGACY_COMMAND = "##["


def _visible(char: str) -> str:
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _neutralise(line: str) -> str:
    line = _COMMAND_AT_START.sub(lambda m: m.group(1) + "\\x3a", line)
    return line.replace(_LEGACY_COMMAND, "#\\x23[")


def shown(value: object) -> str:
    """One value from outside, safe to put anywhere in a line: control and line-breaking characters
    (and backslashes, so the result is unambiguous) become visible escapes, and a workflow command
    at its start or a legacy `##[` one anywhere is broken up."""
    return _neutralise(_UNSAFE_OR_BACKSLASH_RE.sub(lambda m: _visible(m.group()), str(value)))


def has_unsafe_characters(text: str) -> bool:
    """Whether `text` holds control or line-breaking characters (which shown() would escape)."""
    return _UNSAFE_RE.search(text) is not None


def safe_lines(text: str) -> str:
    """Defence at the edge, for whole messages already built from `shown()` values: any control
    character left becomes visible (newlines between lines excepted) and no line can be read by the
    runner as a workflow command."""
    lines = text.split("\n")
    return "\n".join(_neutralise(_UNSAFE_RE.sub(lambda m: _visible(m.group()), line)) for line in lines)


def annotation(text: str) -> str:
    """A workflow command's message, encoded as the runner decodes it (`%`, CR, LF)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def annotation_property(text: str) -> str:
    """A workflow command's property value (e.g. `title=`): also `:` and `,`."""
    return annotation(text).replace(":", "%3A").replace(",", "%2C")


def md_code(value: object, *, already_shown: bool = False) -> str:
    """A value as a Markdown code span, safe inside a table cell: nothing in it renders (no links,
    no HTML, no emphasis), and it cannot end the span, the cell or the line. `already_shown`: the
    value was made by shown() or safe_lines() (a message, a label), so it is not escaped twice."""
    text = (safe_lines(str(value)).replace("\n", " ") if already_shown else shown(value)).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def log(message: str, stream: TextIO | None = None) -> None:
    """A progress or warning line on stderr."""
    print(safe_lines(message), file=stream or sys.stderr, flush=True)
