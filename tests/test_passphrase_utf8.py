"""A passphrase that is not UTF-8 (bytes in the environment, os.environb, that Python holds as lone
surrogates) is refused by the passphrase rule, in the library and in decrypt.py alike, with a
clear error that shows none of it, never a traceback (key_id and openssl need its UTF-8 bytes;
a UnicodeEncodeError would print one of its characters)."""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from backupkit.config import passphrase as library_passphrase_rule
from backupkit.errors import BackupError, UsageError
from tests.conftest import PASSPHRASE, error_lines
from tests.test_decrypt import DECRYPT, env, load_standalone, openssl_encrypt

standalone = load_standalone()
SECRET = "s3cr3t-tail"
NOT_UTF8 = ["pa\udcffss" + SECRET, "\udcc3" + SECRET, "caf\udce9" + SECRET + "\n", "\ud800" + SECRET]


def outcome(function, *args):
    try:
        return ("accepted", function(*args))
    except (BackupError, standalone.Failure) as exc:
        return ("refused", "not valid UTF-8" in str(exc))


@pytest.mark.parametrize("value", NOT_UTF8)
def test_both_rules_refuse_a_passphrase_that_is_not_utf8_saying_so_and_showing_none_of_it(value):
    with pytest.raises(UsageError) as library:
        library_passphrase_rule(value, "EXTERNAL_BACKUP_ENCRYPTION_KEY")
    with pytest.raises(standalone.Failure) as decrypt_py:
        standalone.one_line(value, "EXTERNAL_BACKUP_ENCRYPTION_KEY")
    for message in (str(library.value), str(decrypt_py.value)):
        assert message.startswith("EXTERNAL_BACKUP_ENCRYPTION_KEY is not valid UTF-8 text: store the passphrase as UTF-8")
        assert SECRET not in message and message.isascii()


# Lone surrogates are what os.environ makes of bytes that are not UTF-8; hypothesis's text()
# never draws them, so they are in the alphabet here.
ODD = st.text(alphabet=st.sampled_from(["a", "é", "☃", " ", "\n", "\r", "\udcff", "\udc80", "\ud800", "\udfff"]), max_size=8)


@given(ODD)
@example("p\udcff\n")
@example("p\n\udcff")
@example("\udcff")
def test_the_passphrase_rule_is_the_librarys_on_text_with_surrogates(value):
    assert outcome(standalone.one_line, value, "X") == outcome(library_passphrase_rule, value)


def bytes_env(base: dict[str, str], **raw: bytes) -> dict[bytes, bytes]:
    """An environment as os.environb holds it, with some values that are not UTF-8."""
    return {**{k.encode(): v.encode() for k, v in base.items()}, **{k.encode(): v for k, v in raw.items()}}


def test_decrypt_py_refuses_a_non_utf8_passphrase_from_the_environment(tmp_path):
    infile, outfile = tmp_path / "b.sql.encrypted", tmp_path / "out.sql"
    openssl_encrypt(infile, b"-- PostgreSQL database dump complete\n")
    for name in ("EXTERNAL_BACKUP_ENCRYPTION_KEY", "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS"):
        done = subprocess.run([*DECRYPT, "--filein", str(infile), "--fileout", str(outfile)],
                              env=bytes_env(env(), **{name: b"pa\xffss" + SECRET.encode()}), capture_output=True)
        stderr = done.stderr.decode()
        assert done.returncode == 1 and "Traceback" not in stderr, stderr
        assert error_lines(stderr) == [f"error: {name} is not valid UTF-8 text: store the passphrase as UTF-8 "
                                       "(the backups' key_id is derived from its UTF-8 bytes)"], stderr
        assert SECRET not in stderr and not os.path.exists(outfile)


def test_the_library_refuses_a_non_utf8_passphrase_from_the_environment(run):
    for name in ("EXTERNAL_BACKUP_ENCRYPTION_KEY", "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS"):
        base = {**{k: v for k, v in run.env.items() if v is not None}, "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE}
        done = subprocess.run(run.command("backup_database.py"), cwd=run.cwd, capture_output=True,
                              env=bytes_env(base, **{name: b"\xc3" + SECRET.encode()}))
        stderr = done.stderr.decode()
        assert done.returncode == 2 and "Traceback" not in stderr, stderr
        assert error_lines(stderr) == [f"error: {name} is not valid UTF-8 text: store the passphrase as UTF-8 "
                                       "(the backups' key_id is derived from its UTF-8 bytes)"], stderr
        assert SECRET not in stderr and done.stdout == b""
