"""decrypt.py held to the library by running both on the same inputs: key_id, the passphrase rule,
the passphrase a manifest names, which manifests are accepted, the children's environment, and
the cause each names for the same damaged backup.

decrypt.py stays one standalone file (an operator copies it alone to a restore machine), so it
copies these rules instead of importing them. Where it differs on purpose, the test says so:
- no bucket: a manifest is not compared with the key, kind and environment it was found under (the
  library's reader does); decrypt.py compares it with the file's own format instead;
- an AES Crypt archive is stopped at the size its manifest promises, as every output of
  decrypt.py is (a file on disk); the library decrypts an archive whole and then compares sizes;
- the library reads a dump's SQL as psql would and refuses what pg_dump never writes (it feeds
  psql); decrypt.py writes a file that nothing runs, and does not (the dumps here are as pg_dump
  writes them);
- a wrong passphrase that passes openssl's padding check without a manifest (1 in 256): decrypt.py
  sees noise where SQL text should be and says wrong passphrase, the library says the dump is
  incomplete (tests/test_decrypt.py has that case for decrypt.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

# The library's side of every comparison, named once: when backupkit's modules move, only these lines change.
from backupkit.archive_read import read_archive as library_read_archive
from backupkit.config import child_env as library_child_env
from backupkit.config import passphrase as library_passphrase_rule
from backupkit.crypto import OPENSSL_CIPHER_ARGS as LIBRARY_OPENSSL_ARGS
from backupkit.crypto import OPENSSL_WRITE_FAILED as LIBRARY_OPENSSL_WRITE_FAILED
from backupkit.crypto import key_id as library_key_id
from backupkit.crypto import pick_passphrase as library_pick_passphrase
from backupkit.dump_reader import verify_dump as library_verify_dump
from backupkit.errors import BackupError as LibraryRefusal
from backupkit.manifest import parse_manifest as library_parse_manifest
from backupkit.retrieve import open_local as library_open_local
from tests.backup_factory import aescrypt, streamed_zip
from tests.conftest import OLD_PASSPHRASE, PASSPHRASE, error_lines
from tests.procwatch import SpyBin
from tests.test_decrypt import DECRYPT, env, load_standalone, manifest_for, zstd_bomb


def library_reads(path, kind: str, passphrases: list[str]) -> None:
    """The library reading a local backup file (`--file`), checked against FILE.manifest.json when there is one."""
    work = library_verify_dump if kind == "database" else library_read_archive
    library_open_local(str(path), kind, passphrases, work, require_manifest=False)


standalone = load_standalone()


def outcome(function, *args):
    """How one side answered: ("accepted", what it returned) or ("refused",)."""
    try:
        return ("accepted", function(*args))
    except (LibraryRefusal, standalone.Failure):
        return ("refused",)


# -- key_id ---------------------------------------------------------------------------------------
PASSPHRASES = [
    PASSPHRASE, OLD_PASSPHRASE, "zoë ☃ 密码 🔑", "  spaces around  ", "tab\tinside", PASSPHRASE + "\n", PASSPHRASE + "\r\n",
    "\u00e9t\u00e9", "e\u0301te\u0301",  # the same word, NFC and NFD: neither side normalises
    "x" * 1000, "",
]


def test_key_id_is_the_librarys():
    # PBKDF2 releases the GIL: both sides' fifth of a second per passphrase on every core.
    with ThreadPoolExecutor(2) as pool:
        mine = list(pool.map(standalone.key_id, PASSPHRASES))
        theirs = list(pool.map(library_key_id, PASSPHRASES))
    assert mine == theirs
    assert len(set(mine)) == len(PASSPHRASES)


# -- the passphrase rule: a trailing CR/LF dropped, one inside refused ------------------------------
BREAKY = st.text(alphabet=st.sampled_from(["a", "é", " ", "\t", "\r", "\n", "\x0b", "\x85", "\u2028", "\x00"]), max_size=8)


@given(st.one_of(st.text(), BREAKY))
@example("p\n")
@example("p\r\n")
@example("p\n\r\n")
@example("a\nb")
@example("a\rb")
@example("\n")
@example("")
def test_the_passphrase_rule_is_the_librarys(value):
    assert outcome(standalone.one_line, value, "X") == outcome(library_passphrase_rule, value)


# -- the passphrase a manifest's key_id names -----------------------------------------------------
@pytest.mark.parametrize(("made_with", "given"), [
    pytest.param(PASSPHRASE, [PASSPHRASE], id="current"),
    pytest.param(PASSPHRASE, [OLD_PASSPHRASE, PASSPHRASE], id="second-given"),
    pytest.param(OLD_PASSPHRASE, [PASSPHRASE, OLD_PASSPHRASE], id="previous"),
    pytest.param(PASSPHRASE + "\n", [OLD_PASSPHRASE, PASSPHRASE], id="stored-with-a-newline-before-the-rule"),
    pytest.param(PASSPHRASE + "\r\n", [PASSPHRASE], id="stored-with-CRLF-not-found"),
    pytest.param("zoë ☃ 密码 🔑", [PASSPHRASE, OLD_PASSPHRASE], id="neither"),
])
def test_the_passphrase_a_manifest_names_is_the_one_the_library_picks(made_with, given):
    wanted = library_key_id(made_with)
    mine, theirs = outcome(standalone.pick_passphrase, wanted, given), outcome(library_pick_passphrase, wanted, given)
    assert mine == theirs
    if mine == ("refused",):  # both say which key_id is needed and which ones were given
        for pick in (standalone.pick_passphrase, library_pick_passphrase):
            with pytest.raises((LibraryRefusal, standalone.Failure)) as refusal:
                pick(wanted, given)
            assert all(key in str(refusal.value) for key in [wanted, *map(library_key_id, given)])


# -- which manifests are accepted -----------------------------------------------------------------
DATABASE = {
    "manifest_version": 1, "kind": "database", "environment": "production",
    "key": "production/database/2026-11-29--10-00-00.sql.encrypted", "version_id": "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY",
    "started_at": "2026-11-29T10:00:00Z", "completed_at": "2026-11-29T10:00:42Z", "encryption": "openssl-aes-256-cbc-pbkdf2",
    "compression": "none", "key_id": "0123456789abcdef", "encrypted_size": 123456, "encrypted_sha256": "a" * 64,
    "plaintext_size": 120000, "plaintext_sha256": "b" * 64,
    "source": {"database": "app", "server_version": "17.6", "pg_dump_version": "17.6"}, "tool_version": "1.4.0",
}
VALID = {
    "database": DATABASE,
    "database-zstd": {**DATABASE, "key": "production/database/2026-11-29--10-00-00.sql.zst.encrypted", "compression": "zstd",
                      "compressed_size": 40000, "compressed_sha256": "c" * 64},
    "database-before-compression": {k: v for k, v in DATABASE.items() if k != "compression"},
    "files": {
        **{k: v for k, v in DATABASE.items() if k not in ("compression", "source")},
        "kind": "files", "key": "staging-2/files/2026-11-29--10-00-00.zip.encrypted", "environment": "staging-2",
        "version_id": None, "encryption": "aescrypt-v2",
        "source": {"bucket": "app-uploads", "prefix": "uploads/", "object_count": 3, "total_bytes": 0,
                   "skipped": ["gone.txt"], "skipped_count": 1},
    },
}
PROFILE = {"key": DATABASE["key"] + ".profile.encrypted", "version_id": "p1", "size": 4096, "sha256": "d" * 64, "entries": 12}
VALID["database-with-profile"] = {**DATABASE, "profile": PROFILE}
# Put in place of each field in turn.
WRONG = {
    "null": None, "true": True, "false": False, "zero": 0, "one": 1, "negative": -1, "2^53": 2**53, "2^53-1": 2**53 - 1,
    "float": 1.0, "empty": "", "text": "x", "list": [], "dict": {}, "nested": {"a": [{"b": None}]}, "1025-chars": "x" * 1025,
    "hex16": "0123456789abcdef", "hex64": "f" * 64, "upper-hex64": "F" * 64, "iso": "2026-11-29T10:00:00Z",
    "database-key": DATABASE["key"], "list-of-numbers": [1, 2],
}
CRAFTED = {
    "key-with-a-newline": {"key": DATABASE["key"] + "\n"},
    "key-climbing-out": {"key": "production/database/../2026-11-29--10-00-00.sql.encrypted"},
    "key-of-another-environment": {"key": "staging/database/2026-11-29--10-00-00.sql.encrypted"},
    "key-of-the-other-kind": {"key": "production/files/2026-11-29--10-00-00.zip.encrypted"},
    "key-in-month-13": {"key": "production/database/2026-13-29--10-00-00.sql.encrypted", "started_at": "2026-13-29T10:00:00Z"},
    "key-in-other-digits": {"key": "production/database/２０２６-11-29--10-00-00.sql.encrypted"},
    "key-of-the-other-compression": {"key": "production/database/2026-11-29--10-00-00.sql.zst.encrypted"},
    "compression-lz4": {"compression": "lz4"},
    "compression-ZSTD": {"compression": "ZSTD"},
    "compression-zstd-with-the-plain-suffix": {"compression": "zstd", "compressed_size": 1, "compressed_sha256": "c" * 64},
    "compression-zstd-without-its-fields": {"compression": "zstd", "key": VALID["database-zstd"]["key"]},
    "compressed-size-a-bool": {"compressed_size": True},
    "environment-capitalised": {"environment": "Production"},
    "environment-with-a-newline": {"environment": "production\n"},
    "started-later-than-its-name": {"started_at": "2026-11-29T10:00:01Z"},
    "completed-before-it-started": {"completed_at": "2026-11-29T09:59:59Z"},
    "times-in-other-digits": {"completed_at": "２０２６-11-29T10:00:42Z"},
    "tool-version-64-chars": {"tool_version": "v" * 64},
    "tool-version-65-chars": {"tool_version": "v" * 65},
    "version-id-1024-chars": {"version_id": "v" * 1024},
    "version-id-missing": {"version_id": ...},
    "key-id-upper-case": {"key_id": "0123456789ABCDEF"},
    "key-id-15-digits": {"key_id": "0123456789abcde"},
    "key-id-17-digits": {"key_id": "0123456789abcdef0"},
    "sha256-63-digits": {"encrypted_sha256": "a" * 63},
    "manifest-version-2": {"manifest_version": 2},
    "manifest-version-true": {"manifest_version": True},
    "manifest-version-float": {"manifest_version": 1.0},
    "encryption-of-the-other-kind": {"encryption": "aescrypt-v2"},
    "encryption-of-files": {"encryption": "openssl-aes-256-cbc-pbkdf2"},
    "kind-capitalised": {"kind": "Database"},
    "kind-unknown": {"kind": "wal"},
    "extra-fields": {"comment": "hello", "nested": {"deep": [1, 2, {"x": None}]}},
    "skipped-1000": {"source": {**VALID["files"]["source"], "skipped": ["k"] * 1000}},
    "skipped-1001": {"source": {**VALID["files"]["source"], "skipped": ["k"] * 1001}},
    "skipped-not-text": {"source": {**VALID["files"]["source"], "skipped": ["k", 1]}},
    "skipped-count-a-bool": {"source": {**VALID["files"]["source"], "skipped_count": True}},
    "skipped-count-negative": {"source": {**VALID["files"]["source"], "skipped_count": -1}},
    "object-count-a-bool": {"source": {**VALID["files"]["source"], "object_count": True}},
    "source-of-the-other-kind": {"source": VALID["files"]["source"]},
    "source-with-extra-fields": {"source": {**DATABASE["source"], "extra": [1]}},
    "profile-of-another-backup": {"profile": {**PROFILE, "key": "production/database/2026-11-29--10-00-01.sql.encrypted.profile.encrypted"}},
    "profile-unversioned": {"profile": {**PROFILE, "version_id": None}},
    "profile-with-an-extra-field": {"profile": {**PROFILE, "rows": 5}},
    "profile-without-entries": {"profile": {k: v for k, v in PROFILE.items() if k != "entries"}},
    "profile-size-a-bool": {"profile": {**PROFILE, "size": True}},
    "profile-entries-negative": {"profile": {**PROFILE, "entries": -1}},
    "profile-sha256-upper": {"profile": {**PROFILE, "sha256": "D" * 64}},
    "profile-version-1025-chars": {"profile": {**PROFILE, "version_id": "v" * 1025}},
    "profile-a-list": {"profile": [PROFILE]},
    "profile-null": {"profile": None},
}


def changed(manifest: dict, changes: dict) -> dict:
    """`manifest` with `changes` applied, a value of ... removing its field."""
    return {k: v for k, v in {**manifest, **changes}.items() if v is not ...}


def with_source(manifest: dict, name: str, value) -> dict:
    return {**manifest, "source": changed(manifest["source"], {name: value})}


def dumped(manifest, indent: int | None = 2) -> bytes:
    return json.dumps(manifest, indent=indent, ensure_ascii=False).encode()


def padded_to(size: int) -> bytes:
    body = dumped(DATABASE)
    return body[:-1] + b" " * (size - len(body)) + b"}"


def manifest_corpus() -> dict[str, bytes]:
    """Valid manifests, and each of them with every field missing or wrong in turn, crafted ones,
    and bodies that are not manifests at all."""
    corpus = {}
    for name, good in VALID.items():
        corpus[name] = dumped(good)
        for field_name in [*good, "compression", "compressed_size", "compressed_sha256"]:
            corpus[f"{name}: no {field_name}"] = dumped(changed(good, {field_name: ...}))
            for label, value in WRONG.items():
                corpus[f"{name}: {field_name} {label}"] = dumped({**good, field_name: value})
        for source_field in [*good["source"], "skipped_count"]:
            corpus[f"{name}: no source {source_field}"] = dumped(with_source(good, source_field, ...))
            for label, value in WRONG.items():
                corpus[f"{name}: source {source_field} {label}"] = dumped(with_source(good, source_field, value))
        for label, changes in CRAFTED.items():
            corpus[f"{name}: {label}"] = dumped(changed(good, changes))
    corpus |= {
        "empty": b"", "null": b"null", "array": b"[]", "a string": b'"manifest"', "cut": dumped(DATABASE)[:-1],
        "nested too deep": b"[" * 100_000 + b"]" * 100_000, "not UTF-8": b"\xff" + dumped(DATABASE),
        "UTF-16": json.dumps(DATABASE).encode("utf-16"), "UTF-8 with a BOM": b"\xef\xbb\xbf" + dumped(DATABASE),
        "one line": dumped(DATABASE, indent=None),
        "at the size limit": padded_to(256 * 1024), "a byte over the size limit": padded_to(256 * 1024 + 1),
        "NaN for a size": dumped(DATABASE).replace(b'"encrypted_size": 123456', b'"encrypted_size": NaN'),
        "size as a float": dumped(DATABASE).replace(b'"encrypted_size": 123456', b'"encrypted_size": 123456.0'),
        "size in exponent form": dumped(DATABASE).replace(b'"encrypted_size": 123456', b'"encrypted_size": 1e400'),
        "a key_id given twice, the last valid": dumped(DATABASE).replace(b'"key_id"', b'"key_id": "bad", "key_id"'),
        "a key_id given twice, the last invalid": dumped(DATABASE).replace(b'"key_id": "0123456789abcdef"',
                                                                            b'"key_id": "0123456789abcdef", "key_id": 7'),
    }
    return corpus


def standalone_parse(body: bytes) -> dict:
    return standalone.parse_manifest(body, "M")


def test_decrypt_py_accepts_exactly_the_manifests_the_library_accepts():
    """Compared without the key, kind and environment a bucket reader also checks (decrypt.py has
    no bucket); with them, the library only refuses more."""
    corpus = manifest_corpus()
    answers = {name: (outcome(standalone_parse, body), outcome(library_parse_manifest, body)) for name, body in corpus.items()}
    disagree = {name: (mine[0], theirs[0]) for name, (mine, theirs) in answers.items() if mine != theirs}
    assert disagree == {}, f"{len(disagree)} of {len(corpus)} disagree (decrypt.py, library): {disagree}"
    accepted = {name for name, (mine, _) in answers.items() if mine[0] == "accepted"}
    assert {*VALID, "at the size limit", "UTF-16", "one line", "files: extra-fields", "database: profile-unversioned"} <= accepted
    profiles_accepted = {name for name in accepted if "profile-" in name}
    assert profiles_accepted == {f"{name}: profile-unversioned" for name in ("database", "database-before-compression",
                                                                             "database-with-profile")}
    assert len(corpus) - len(accepted) > 1000  # most of the corpus is refused


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
NEAR_VALUES = st.sampled_from([v for m in VALID.values() for v in m.values()] + [*WRONG.values(), ...])
KEYS = st.from_regex(r"[a-z0-9-]{1,4}/(database|files)/\d{4}-\d\d-\d\d--\d\d-\d\d-\d\d\.(sql|zip)(\.zst)?\.encrypted\n?", fullmatch=True)
FIELDS = sorted({*DATABASE, *VALID["database-zstd"], *VALID["files"]})
SOURCE = sorted({*DATABASE["source"], *VALID["files"]["source"]})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(VALID)), st.sampled_from([*FIELDS, *(f"source.{s}" for s in SOURCE)]),
       st.one_of(JSON_VALUES, NEAR_VALUES, KEYS))
def test_any_one_field_changed_decrypt_py_and_the_library_agree(which, name, value):
    good = VALID[which]
    manifest = with_source(good, name.removeprefix("source."), value) if name.startswith("source.") else changed(good, {name: value})
    body = dumped(manifest)
    assert outcome(standalone_parse, body) == outcome(library_parse_manifest, body)


# -- the children's environment -------------------------------------------------------------------
RUNNER = {  # what a shell holds during an incident, or a GitHub Actions job
    "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE, "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS": OLD_PASSPHRASE,
    "DATABASE_URL": "postgresql://app:pw@db/app", "TARGET_DATABASE_URL": "postgresql://app:pw@db/restored", "PGPASSWORD": "pw",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "session",
    "SOURCE_AWS_SECRET_ACCESS_KEY": "s3cr3t2", "SOURCE_AWS_SESSION_TOKEN": "session2", "BACKUP_HEARTBEAT_URL": "https://hc/x",
    "GITHUB_TOKEN": "ghs_token", "ACTIONS_ID_TOKEN_REQUEST_URL": "https://oidc", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "oidc",
    "ACTIONS_RUNTIME_TOKEN": "runtime", "GITHUB_ACTIONS": "true", "GITHUB_TOKEN_PATH": "kept", "actions_lower": "kept",
    "HOME": "/root", "LANG": "C.UTF-8", "PGHOST": "db",
}
NAMES = st.one_of(st.sampled_from(sorted(RUNNER)), st.from_regex(r"(ACTIONS_|GITHUB_|AWS_|)[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True))
VALUES = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=10)


@given(st.dictionaries(NAMES, VALUES, max_size=12))
@example(RUNNER)
def test_children_get_the_environment_the_librarys_children_get(environment):
    with mock.patch.dict(os.environ, environment, clear=True):
        assert standalone.child_env() == library_child_env()


def test_openssl_and_zstd_started_by_decrypt_py_get_that_environment(tmp_path):
    """The real children, recorded by wrappers as they start: the same environment a library stage
    gets from the same parent environment."""
    spy = SpyBin(tmp_path / "spy", {name: shutil.which(name) for name in ("openssl", "zstd")})
    encrypted = tmp_path / "x.sql.zst.encrypted"
    encrypted.write_bytes(openssl(SQL_ZST))
    parent = {**RUNNER, "PATH": f"{spy.dir}:/usr/bin:/bin"}
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "x.sql")], env=parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with mock.patch.dict(os.environ, parent, clear=True):
        expected = library_child_env()
    recorded = {record.program: record.env for record in spy.records()}
    assert sorted(recorded) == ["openssl", "zstd"]
    assert recorded["openssl"] == recorded["zstd"] == expected


# -- the cause each names for the same failure ----------------------------------------------------
# "The same cause" is the same set of these, each found by its pattern in what the message says in
# its own words (what openssl, zstd or pyAesCrypt said, in parentheses, left out).
CAUSES = {
    "wrong passphrase": r"wrong passphrase",
    "passphrase not given": r"key_id",
    "corrupted": r"corrupt|damaged",
    "cut short": r"truncated|incomplete|cut short",
    "decompression failed": r"decompression failed|does not decompress",
    "over the promised size": r"promise",
}
TOOL_SAYS = re.compile(r"\((openssl|zstd|AES Crypt)\b")


def own_words(message: str) -> str:
    while match := TOOL_SAYS.search(message):
        depth, end = 0, len(message)
        for end in range(match.start(), len(message)):
            depth += {"(": 1, ")": -1}.get(message[end], 0)
            if depth == 0:
                break
        message = message[:match.start()] + message[end + 1:]
    return message


def causes(message: str | None, directory) -> set[str]:
    if message is None:
        return set()
    said = own_words(message.replace(str(directory), "DIR"))
    return {cause for cause, pattern in CAUSES.items() if re.search(pattern, said, re.IGNORECASE)}


# A dump as pg_dump writes one (the library's guard passes it on to psql), not too repetitive to decompress
# within decrypt.py's --max-ratio.
DUMP = (b"--\n-- PostgreSQL database dump\n--\n\nSET client_encoding = 'UTF8';\nCREATE TABLE public.t (id integer, name text);\n"
        b"COPY public.t (id, name) FROM stdin;\n" + b"".join(b"%d\tzo\xc3\xab %d\n" % (i, i * 7919 % 1000003) for i in range(5000))
        + b"\\.\n\n--\n-- PostgreSQL database dump complete\n--\n\n")
FIXED_SALT = "0011223344556677"  # so whether a wrong passphrase passes openssl's padding check is fixed too
WRONG_PASSPHRASE = "not-the-Passphrase-0"
ZIP = streamed_zip({"a.txt": b"1"})


def openssl(data: bytes, passphrase: str = PASSPHRASE) -> bytes:
    """As `openssl enc` writes it; given the salt, openssl leaves out the header that names it."""
    body = subprocess.run(["openssl", "enc", "-aes-256-cbc", "-pbkdf2", "-S", FIXED_SALT, "-pass", "env:K"], input=data,
                          capture_output=True, check=True, env={"K": passphrase, "PATH": "/usr/bin:/bin"}).stdout
    return b"Salted__" + bytes.fromhex(FIXED_SALT) + body


def stock_openssl_refuses(data: bytes, passphrase: str) -> bool:
    return subprocess.run(["openssl", "enc", "-d", "-aes-256-cbc", "-pbkdf2", "-pass", "env:K"], input=data,
                          capture_output=True, env={"K": passphrase, "PATH": "/usr/bin:/bin"}).returncode != 0


def flipped(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:]


@dataclass
class Backup:
    """A backup file as the operator has it, and how it is read."""

    name: str
    data: bytes
    plaintext: bytes | None = None  # what the manifest describes; None: no manifest
    compression: str = "none"
    promised: int | None = None  # a manifest's plaintext_size that is not the plaintext's
    passphrases: list[str] = field(default_factory=lambda: [PASSPHRASE])
    damage: object = None  # applied to the file after its manifest was made

    @property
    def kind(self) -> str:
        return "database" if self.data.startswith(b"Salted__") else "files"


def decompresses_badly() -> bytes:
    return openssl(bytes.fromhex("28b52ffd") + bytes(range(256)) * 64)


SQL_ZST = subprocess.run(["zstd", "-q", "-c"], input=DUMP, capture_output=True, check=True).stdout
BACKUPS = [
    # (the backup, the causes both name; decrypt.py's when it differs on purpose)
    pytest.param(Backup("x.sql.encrypted", openssl(DUMP), DUMP), set(), None, id="genuine-dump"),
    pytest.param(Backup("x.sql.zst.encrypted", openssl(SQL_ZST), DUMP, "zstd"), set(), None, id="genuine-compressed-dump"),
    pytest.param(Backup("x.zip.encrypted", aescrypt(ZIP, PASSPHRASE), ZIP), set(), None, id="genuine-archive"),
    pytest.param(Backup("x.sql.zst.encrypted", openssl(SQL_ZST), passphrases=[WRONG_PASSPHRASE, OLD_PASSPHRASE, PASSPHRASE]),
                 set(), None, id="genuine-compressed-dump-without-manifest"),
    pytest.param(Backup("x.zip.encrypted", aescrypt(ZIP, PASSPHRASE), passphrases=[OLD_PASSPHRASE, PASSPHRASE]),
                 set(), None, id="genuine-archive-without-manifest"),
    pytest.param(Backup("x.sql.encrypted", openssl(DUMP), passphrases=[WRONG_PASSPHRASE]),
                 {"wrong passphrase", "corrupted"}, None, id="wrong-passphrase-dump"),
    pytest.param(Backup("x.zip.encrypted", aescrypt(ZIP, PASSPHRASE), passphrases=[WRONG_PASSPHRASE]),
                 {"wrong passphrase", "corrupted"}, None, id="wrong-passphrase-archive"),
    pytest.param(Backup("x.sql.encrypted", openssl(DUMP), DUMP, passphrases=[OLD_PASSPHRASE]),
                 {"passphrase not given"}, None, id="passphrase-not-given-dump"),
    pytest.param(Backup("x.zip.encrypted", aescrypt(ZIP, PASSPHRASE), ZIP, passphrases=[OLD_PASSPHRASE, WRONG_PASSPHRASE]),
                 {"passphrase not given"}, None, id="passphrase-not-given-archive"),
    pytest.param(Backup("x.sql.encrypted", openssl(DUMP), DUMP, damage=flipped), {"corrupted"}, None, id="corrupted-dump"),
    pytest.param(Backup("x.zip.encrypted", aescrypt(ZIP, PASSPHRASE), ZIP, damage=flipped), {"corrupted"}, None, id="corrupted-archive"),
    pytest.param(Backup("x.zip.encrypted", flipped(aescrypt(ZIP, PASSPHRASE))),
                 {"wrong passphrase", "corrupted"}, None, id="corrupted-archive-without-manifest"),
    pytest.param(Backup("x.sql.encrypted", openssl(DUMP), DUMP, damage=lambda d: d[:-4096]),
                 {"cut short", "corrupted"}, None, id="cut-short-dump"),
    pytest.param(Backup("x.zip.encrypted", aescrypt(ZIP, PASSPHRASE), ZIP, damage=lambda d: d[:-100]),
                 {"cut short", "corrupted"}, None, id="cut-short-archive"),
    pytest.param(Backup("x.sql.encrypted", openssl(DUMP)[:-4096]),
                 {"wrong passphrase", "corrupted"}, None, id="cut-short-dump-without-manifest"),
    pytest.param(Backup("x.zip.encrypted", aescrypt(ZIP, PASSPHRASE)[:-100]),
                 {"wrong passphrase", "corrupted"}, None, id="cut-short-archive-without-manifest"),
    pytest.param(Backup("x.sql.encrypted", openssl(DUMP[:-200])), {"cut short"}, None, id="dump-without-its-trailer"),
    pytest.param(Backup("x.sql.zst.encrypted", decompresses_badly(), b"SELECT 1;\n", "zstd"),
                 {"decompression failed", "corrupted"}, None, id="decompression-fails"),
    pytest.param(Backup("x.sql.zst.encrypted", decompresses_badly()),
                 {"decompression failed", "corrupted"}, None, id="decompression-fails-without-manifest"),
    pytest.param(Backup("x.sql.zst.encrypted", openssl(zstd_bomb(2**20)), b"", "zstd", promised=64),
                 {"over the promised size", "corrupted"}, None, id="over-the-promised-size-dump"),
    pytest.param(Backup("x.sql.encrypted", openssl(DUMP), DUMP + b"-- not this\n"), {"corrupted"}, None, id="other-plaintext-dump"),
    pytest.param(Backup("x.zip.encrypted", aescrypt(ZIP, PASSPHRASE), ZIP[:-1] + b"?"), {"corrupted"}, None,
                 id="other-plaintext-archive"),
    # On purpose: decrypt.py stops every output at the promise (module docstring).
    pytest.param(Backup("x.zip.encrypted", aescrypt(ZIP, PASSPHRASE), ZIP, promised=len(ZIP) - 1),
                 {"corrupted"}, {"corrupted", "over the promised size"}, id="over-the-promised-size-archive"),
]


@pytest.mark.parametrize(("backup", "both_say", "decrypt_py_says"), BACKUPS)
def test_the_same_failure_is_blamed_on_the_same_cause(tmp_path, backup, both_say, decrypt_py_says):
    path = tmp_path / backup.name
    path.write_bytes(backup.data)
    if backup.plaintext is not None:
        manifest = manifest_for(path, backup.plaintext, backup.compression, key_id=library_key_id(PASSPHRASE))
        if backup.promised is not None:
            manifest["plaintext_size"] = backup.promised
        (tmp_path / f"{backup.name}.manifest.json").write_text(json.dumps(manifest))
    if backup.damage is not None:
        path.write_bytes(backup.damage(backup.data))
    if WRONG_PASSPHRASE in backup.passphrases and backup.kind == "database":
        assert stock_openssl_refuses(path.read_bytes(), WRONG_PASSPHRASE), "pick another WRONG_PASSPHRASE"

    try:
        library_reads(path, backup.kind, backup.passphrases)
        theirs = None
    except LibraryRefusal as exc:
        theirs = str(exc)
    current, *previous = backup.passphrases
    done = subprocess.run([*DECRYPT, "-i", str(path), "-o", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env(EXTERNAL_BACKUP_ENCRYPTION_KEY=current, EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS=",".join(previous)))
    assert "Traceback" not in done.stderr and len(error_lines(done.stderr)) == (done.returncode != 0), done.stderr
    mine = error_lines(done.stderr)[0].removeprefix("error: ") if done.returncode else None

    assert (causes(theirs, tmp_path), causes(mine, tmp_path)) == (both_say, decrypt_py_says or both_say), (theirs, mine)
    assert (theirs is None, mine is None) == (not both_say, not both_say)


# -- copies no comparison above exercises reliably -------------------------------------------------
def test_the_openssl_command_line_and_its_write_failure_are_the_librarys():
    """The cipher arguments: a changed -iter would fail every restore, yet only the end-to-end tests
    (test_fetch_backup.py) decrypt a backup made by the library. The text by which openssl says the
    stage after it stopped reading: seen only when zstd fails while openssl still writes, a race."""
    assert standalone.OPENSSL_ARGS == LIBRARY_OPENSSL_ARGS
    assert standalone.OPENSSL_WRITE_FAILED == LIBRARY_OPENSSL_WRITE_FAILED
