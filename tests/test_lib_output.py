"""backupkit.output and the edges of backupkit.cli: what others wrote is escaped before it is
printed, secrets are redacted, and a failure is one line (plus its annotation and summary)."""

from __future__ import annotations

import re

import pytest

from backupkit import cli, config, redaction
from backupkit.errors import BackupError
from backupkit.output import annotation, annotation_property, has_unsafe_characters, md_code, safe_lines, shown

RUNNER_COMMAND = re.compile(r"^\s*::|##\[")


def runner_lines(text: str) -> list[str]:
    """What the Actions runner reads as lines: it splits at \\r too."""
    return re.split(r"\r\n|\r|\n", text)


@pytest.mark.parametrize("value", [
    "\r::add-mask::secret", "\n::stop-commands::x", "::error::forged", "  ::warning::indented", "a ##[error]legacy",
    "\x1b]0;title\x07\x1b[2J", "tab\there", "line\u2028separator", "bidi \u202e reversed", "zero\u200bwidth", "back\\slash",
])
def test_shown_values_are_one_visible_line_that_no_runner_reads_as_a_command(value):
    text = shown(value)
    [line] = runner_lines(text)
    assert not RUNNER_COMMAND.search(line)
    assert not has_unsafe_characters(text)


def test_shown_keeps_ordinary_text_as_it_is():
    for value in ("production/database/2026-11-29--10-00-00.sql.zst.encrypted", "Zoë Ångström 李小龍.png", "a::b"):
        assert shown(value) == value


def test_shown_is_unambiguous():
    assert shown("\\x1b") != shown("\x1b")


def test_safe_lines_guards_whole_messages_but_keeps_their_line_breaks():
    text = safe_lines("first line\n::error::forged\nthird \x1b[31m red")
    assert text.count("\n") == 2
    assert not any(RUNNER_COMMAND.search(line) for line in runner_lines(text))
    assert "\x1b" not in text


def test_annotation_values_are_encoded_as_the_runner_decodes_them():
    assert annotation("50% done\r\nnext") == "50%25 done%0D%0Anext"
    assert annotation_property("a:b,c") == "a%3Ab%2Cc"


@pytest.mark.parametrize("value", ["[click](http://evil.example)", "<img src=x onerror=alert(1)>", "`tick`", "a|b", "**bold**",
                                   "``x`", "", "\r\n"])
def test_md_code_is_one_literal_code_span_that_cannot_break_a_table(value):
    span = md_code(value)
    fence = re.match(r"`+", span).group()
    assert span.endswith(fence) and fence not in span[len(fence):-len(fence)]
    assert "\n" not in span and "\r" not in span
    assert "|" not in span.replace("\\|", "")


def test_redaction_covers_every_secret_the_process_knows(monkeypatch):
    monkeypatch.setenv(config.KEY_VAR, "current-Passphrase-1")
    monkeypatch.setenv(config.PREVIOUS_KEY_VAR, "old-Passphrase-2,older-Passphrase-3")
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:db%23Secret@db/app")
    monkeypatch.setenv("TARGET_DATABASE_URL", "postgresql://app:pa#ss-broken@db/app")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-Secret-4")
    redaction.register_secret("flag-Secret-5")
    text = ("current-Passphrase-1 old-Passphrase-2 older-Passphrase-3 db%23Secret db#Secret pa#ss-broken aws-Secret-4 "
            "flag-Secret-5 expected postgresql://USER:PASSWORD@HOST")
    redacted = redaction.redact(text)
    assert redacted.count("***") == 8
    assert "expected postgresql://USER:PASSWORD@HOST" in redacted  # a URL is not blanked whole


def test_a_failure_is_one_line_an_annotation_and_a_summary(monkeypatch, tmp_path, capsys):
    summary, errors = tmp_path / "summary.md", tmp_path / "errors.txt"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("BACKUP_ERROR_FILE", str(errors))
    monkeypatch.setenv(config.KEY_VAR, "the-Passphrase-9")

    def main(argv):
        raise BackupError("could not read s3://b/\r::add-mask::x\nsecond the-Passphrase-9 [a](http://e)")

    with pytest.raises(SystemExit) as exited:
        cli.run(main, [])
    assert exited.value.code == 1
    stderr = capsys.readouterr().err
    lines = runner_lines(stderr.rstrip("\n"))
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("::error title=")
    assert "the-Passphrase-9" not in stderr + summary.read_text() + errors.read_text()
    assert not RUNNER_COMMAND.search(lines[0])
    assert "](http" not in re.sub(r"(`+).+?\1", "", summary.read_text())
    assert errors.read_text().count("\n") == 1
