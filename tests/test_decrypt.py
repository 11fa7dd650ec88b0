"""decrypt.py: both formats, seed-compatible flags, manifests, and no output left on failure."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time

import pyAesCrypt
import pytest

from dev.harness import REPO
from tests.conftest import OLD_PASSPHRASE, PASSPHRASE, error_lines

DECRYPT = [sys.executable, str(REPO / "decrypt.py")]
PLAIN = ("-- some SQL\n" + "INSERT INTO t VALUES ('zoë');\n" * 5000 + "--\n-- PostgreSQL database dump complete\n--\n").encode()


def env(**extra):
    base = {"PATH": "/usr/bin:/bin", "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE}
    return {k: v for k, v in {**base, **extra}.items() if v is not None}


def openssl_encrypt(path, data, passphrase=PASSPHRASE):
    subprocess.run(["openssl", "enc", "-aes-256-cbc", "-pbkdf2", "-out", str(path), "-pass", "env:K"],
                   input=data, check=True, env={"K": passphrase, "PATH": "/usr/bin:/bin"})


def aescrypt_encrypt(path, data, passphrase=PASSPHRASE):
    out = io.BytesIO()
    pyAesCrypt.encryptStream(io.BytesIO(data), out, passphrase, 64 * 1024)
    path.write_bytes(out.getvalue())


def spec_key_id(passphrase: str) -> str:
    """The key_id as the SPEC defines it."""
    return hashlib.pbkdf2_hmac("sha256", passphrase.encode(), b"external-backups key id", 600_000)[:8].hex()


def manifest_for(encrypted, plaintext: bytes | None = None, compression: str = "none", *, plaintext_size: int | None = None,
                 key_id: str | None = None) -> dict:
    """A complete manifest for a local encrypted file, as the backup scripts write one (kind from
    the file's magic bytes), describing `plaintext` (or only promising `plaintext_size` bytes)."""
    data = encrypted.read_bytes()
    kind = "database" if data.startswith(b"Salted__") else "files"
    suffix = {("database", "none"): ".sql.encrypted", ("database", "zstd"): ".sql.zst.encrypted",
              ("files", "none"): ".zip.encrypted"}[(kind, compression)]
    source = ({"database": "app", "server_version": "17.6", "pg_dump_version": "17.6"} if kind == "database" else
              {"bucket": "app-uploads", "prefix": "", "object_count": 1, "total_bytes": 1, "skipped": []})
    return {
        "manifest_version": 1, "kind": kind, "environment": "production",
        "key": f"production/{kind}/2026-11-29--10-00-00{suffix}", "version_id": None,
        "started_at": "2026-11-29T10:00:00Z", "completed_at": "2026-11-29T10:00:42Z",
        "encryption": "openssl-aes-256-cbc-pbkdf2" if kind == "database" else "aescrypt-v2",
        **({"compression": compression} if kind == "database" else {}),
        **({"compressed_size": 1, "compressed_sha256": "0" * 64} if compression == "zstd" else {}),
        "key_id": key_id or spec_key_id(PASSPHRASE), "encrypted_size": len(data),
        "encrypted_sha256": hashlib.sha256(data).hexdigest(),
        "plaintext_size": len(plaintext) if plaintext is not None else plaintext_size,
        "plaintext_sha256": hashlib.sha256(plaintext).hexdigest() if plaintext is not None else "0" * 64,
        "source": source, "tool_version": "test",
    }


@pytest.mark.parametrize("encrypt", [openssl_encrypt, aescrypt_encrypt], ids=["openssl", "aescrypt"])
@pytest.mark.parametrize("flags", [("--filein", "--fileout"), ("-i", "-o"), ("--infile", "--outfile")])
def test_decrypts_both_formats_with_every_flag_spelling(tmp_path, encrypt, flags):
    encrypted = tmp_path / "x.encrypted"
    encrypt(encrypted, PLAIN)
    out = tmp_path / "out"
    subprocess.run([*DECRYPT, flags[0], str(encrypted), flags[1], str(out)], check=True, env=env(), capture_output=True)
    assert out.read_bytes() == PLAIN


@pytest.mark.parametrize("encrypt", [openssl_encrypt, aescrypt_encrypt], ids=["openssl", "aescrypt"])
def test_wrong_passphrase_exits_1_and_leaves_no_output(tmp_path, encrypt):
    encrypted = tmp_path / "x.encrypted"
    encrypt(encrypted, PLAIN)
    out = tmp_path / "out"
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(out)], env=env(EXTERNAL_BACKUP_ENCRYPTION_KEY="nope"),
                          capture_output=True, text=True)
    assert done.returncode == 1 and error_lines(done.stderr) == done.stderr.splitlines()[-1:] and "wrong passphrase" in done.stderr
    assert list(tmp_path.iterdir()) == [encrypted]


@pytest.mark.parametrize("encrypt", [openssl_encrypt, aescrypt_encrypt], ids=["openssl", "aescrypt"])
def test_previous_passphrase_is_tried(tmp_path, encrypt):
    encrypted = tmp_path / "x.encrypted"
    encrypt(encrypted, PLAIN, OLD_PASSPHRASE)
    out = tmp_path / "out"
    subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(out)], check=True, capture_output=True,
                   env=env(EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS=f"something-else,{OLD_PASSPHRASE}"))
    assert out.read_bytes() == PLAIN


def test_password_flag_works_and_warns(tmp_path):
    encrypted = tmp_path / "x.encrypted"
    aescrypt_encrypt(encrypted, PLAIN)
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "o"), "-p", PASSPHRASE],
                          env=env(EXTERNAL_BACKUP_ENCRYPTION_KEY=None), capture_output=True, text=True)
    assert done.returncode == 0 and "process list" in done.stderr


def test_corrupted_aescrypt_fails_on_hmac(tmp_path):
    encrypted = tmp_path / "x.encrypted"
    aescrypt_encrypt(encrypted, PLAIN)
    data = bytearray(encrypted.read_bytes())
    data[len(data) // 2] ^= 0x01
    encrypted.write_bytes(bytes(data))
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "o")], env=env(), capture_output=True, text=True)
    assert done.returncode == 1 and not (tmp_path / "o").exists()


def test_manifest_beside_input_checks_hashes(run, pg, sample_db, s3server, bucket, tmp_path):
    manifest = json.loads(run("backup_database.py", "--database-url", pg.url(sample_db), "--json", check=True).stdout)
    encrypted = tmp_path / "b.sql.encrypted"
    encrypted.write_bytes(s3server.client().get_object(Bucket=bucket, Key=manifest["key"])["Body"].read())
    (tmp_path / "b.sql.encrypted.manifest.json").write_text(json.dumps(manifest))
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "b.sql")], env=env(), capture_output=True, text=True)
    assert done.returncode == 0 and "checked against its manifest" in done.stdout
    manifest["plaintext_sha256"] = "0" * 64
    (tmp_path / "b.sql.encrypted.manifest.json").write_text(json.dumps(manifest))
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "c.sql")], env=env(), capture_output=True, text=True)
    assert done.returncode == 1 and "plaintext size and SHA-256" in done.stderr and not (tmp_path / "c.sql").exists()


@pytest.mark.parametrize("content, expect", [(b"", "empty"), (b"hello world", "not an encrypted backup")])
def test_not_a_backup(tmp_path, content, expect):
    path = tmp_path / "x"
    path.write_bytes(content)
    done = subprocess.run([*DECRYPT, "-i", str(path), "-o", str(tmp_path / "o")], env=env(), capture_output=True, text=True)
    assert done.returncode == 1 and expect in done.stderr


def test_missing_input_and_missing_passphrase(tmp_path):
    done = subprocess.run([*DECRYPT, "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], env=env(), capture_output=True, text=True)
    assert done.returncode == 1 and "no such file" in done.stderr
    path = tmp_path / "x"
    aescrypt_encrypt(path, PLAIN)
    done = subprocess.run([*DECRYPT, "-i", str(path), "-o", str(tmp_path / "o")], env=env(EXTERNAL_BACKUP_ENCRYPTION_KEY=None),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "EXTERNAL_BACKUP_ENCRYPTION_KEY" in done.stderr


def test_openssl_wrong_passphrase_that_passes_padding_is_still_rejected(tmp_path):
    """openssl has no MAC: find a wrong passphrase whose padding happens to check out."""
    encrypted = tmp_path / "x.encrypted"
    openssl_encrypt(encrypted, PLAIN)
    for attempt in range(2000):
        wrong = f"wrong-{attempt}"
        probe = subprocess.run(["openssl", "enc", "-d", "-aes-256-cbc", "-pbkdf2", "-in", str(encrypted), "-out", "/dev/null",
                                "-pass", "env:K"], env={"K": wrong, "PATH": "/usr/bin:/bin"}, capture_output=True)
        if probe.returncode == 0:
            break
    else:
        pytest.skip("no padding-passing wrong passphrase found in 2000 tries")
    out = tmp_path / "out"
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(out)], env=env(EXTERNAL_BACKUP_ENCRYPTION_KEY=wrong),
                          capture_output=True, text=True)
    assert done.returncode == 1 and "wrong passphrase" in done.stderr and not out.exists()
    subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(out)], check=True, capture_output=True,
                   env=env(EXTERNAL_BACKUP_ENCRYPTION_KEY=wrong, EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS=PASSPHRASE))
    assert out.read_bytes() == PLAIN


# -- what an operator can get wrong, and what a planted or damaged file can do ---------------------
def test_an_existing_output_is_never_replaced_without_force(tmp_path):
    encrypted = tmp_path / "x.sql.encrypted"
    openssl_encrypt(encrypted, PLAIN)
    out = tmp_path / "out.sql"
    out.write_text("precious\n")
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(out)], env=env(), capture_output=True, text=True)
    assert done.returncode == 1 and "exists: pass --force" in done.stderr
    assert out.read_text() == "precious\n"
    # Not even the input's own manifest.
    (tmp_path / "x.sql.encrypted.manifest.json").write_text("{}")
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "x.sql.encrypted.manifest.json")],
                          env=env(), capture_output=True, text=True)
    assert done.returncode == 1 and (tmp_path / "x.sql.encrypted.manifest.json").read_text() == "{}"
    (tmp_path / "x.sql.encrypted.manifest.json").unlink()
    subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(out), "--force"], env=env(), check=True, capture_output=True)
    assert out.read_bytes() == PLAIN


def test_a_named_manifest_that_is_missing_is_an_error(tmp_path):
    encrypted = tmp_path / "x.sql.encrypted"
    openssl_encrypt(encrypted, PLAIN)
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "o"), "--manifest", str(tmp_path / "nope.json")],
                          env=env(), capture_output=True, text=True)
    assert done.returncode == 1 and "--manifest" in done.stderr and "no such file" in done.stderr
    assert not (tmp_path / "o").exists()


def test_without_a_manifest_it_says_integrity_is_unchecked_and_refuses_a_cut_dump(tmp_path):
    encrypted = tmp_path / "x.sql.encrypted"
    openssl_encrypt(encrypted, PLAIN)
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "o")], env=env(), capture_output=True, text=True)
    assert done.returncode == 0
    assert "integrity of the output cannot be checked" in done.stderr and "NOT checked" in done.stdout
    cut = tmp_path / "cut.sql.encrypted"
    openssl_encrypt(cut, PLAIN[:-200])
    done = subprocess.run([*DECRYPT, "-i", str(cut), "-o", str(tmp_path / "c")], env=env(), capture_output=True, text=True)
    assert done.returncode == 1 and "completion trailer" in done.stderr and not (tmp_path / "c").exists()


def test_one_passphrase_rule_a_trailing_newline_is_not_part_of_it(tmp_path):
    encrypted = tmp_path / "x.sql.encrypted"
    openssl_encrypt(encrypted, PLAIN)
    out = tmp_path / "o"
    subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(out)], env=env(EXTERNAL_BACKUP_ENCRYPTION_KEY=PASSPHRASE + "\n"),
                   check=True, capture_output=True)
    assert out.read_bytes() == PLAIN
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "p")],
                          env=env(EXTERNAL_BACKUP_ENCRYPTION_KEY=PASSPHRASE[:5] + "\n" + PASSPHRASE[5:]), capture_output=True, text=True)
    assert done.returncode == 1 and "line break" in done.stderr


def test_manifest_key_id_of_a_secret_stored_with_a_newline_still_picks_it(tmp_path):
    """Backups made before the one-line rule from a secret ending in a newline: the key_id was
    taken with the newline, the files backup's key too; both still decrypt."""
    encrypted = tmp_path / "x.zip.encrypted"
    aescrypt_encrypt(encrypted, PLAIN, PASSPHRASE + "\n")
    manifest = manifest_for(encrypted, PLAIN, key_id=spec_key_id(PASSPHRASE + "\n"))
    (tmp_path / "x.zip.encrypted.manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "o"
    subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(out)], env=env(), check=True, capture_output=True)
    assert out.read_bytes() == PLAIN


@pytest.mark.parametrize(("change", "words"), [
    pytest.param({"compression": "zstd", "compressed_size": 1, "compressed_sha256": "0" * 64}, ("'compression'",),
                 id="compressed-archive"),
    pytest.param({"key": "../../etc/passwd"}, ("not a backup key",), id="not-a-backup-key"),
    pytest.param({"plaintext_size": True}, ("'plaintext_size'",), id="bool-for-a-size"),
    pytest.param({"kind": "database", "key": "production/database/2026-11-29--10-00-00.sql.encrypted",
                  "encryption": "openssl-aes-256-cbc-pbkdf2", "source": {"database": "app", "server_version": "17", "pg_dump_version": "17"}},
                 ("AES Crypt", "openssl-aes-256-cbc-pbkdf2", "not the file it describes"), id="another-format"),
])
def test_a_manifest_the_backup_scripts_would_refuse_is_refused(tmp_path, change, words):
    """Matching the file's SHA-256 is not enough: every field is checked as the scripts check it
    (tests/test_decrypt_parity.py holds the two to the same corpus), and it must describe this
    file's format. One error line, nothing written."""
    encrypted = tmp_path / "x.zip.encrypted"
    aescrypt_encrypt(encrypted, PLAIN)
    (tmp_path / "x.zip.encrypted.manifest.json").write_text(json.dumps({**manifest_for(encrypted, PLAIN), **change}))
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "o")], env=env(), capture_output=True, text=True)
    assert done.returncode == 1 and error_lines(done.stderr) == done.stderr.splitlines()[-1:], done.stderr
    assert all(word in done.stderr for word in words), done.stderr
    assert not (tmp_path / "o").exists()


def test_decrypt_py_is_standalone():
    """It imports only the standard library and pyAesCrypt, so it can be copied alone."""
    import ast
    import sys

    tree = ast.parse((REPO / "decrypt.py").read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert modules - {"__future__", "pyAesCrypt"} <= set(sys.stdlib_module_names)


def load_standalone():
    """decrypt.py as a module, in process."""
    spec = importlib.util.spec_from_file_location("decrypt_standalone", REPO / "decrypt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, "Terminated")])
def test_a_signal_while_a_child_starts_is_raised_once_the_child_is_held(sig, raised):
    """Raised inside Popen after the exec, a Ctrl-C or SIGTERM would leave openssl running with
    nothing holding it: decrypt.py holds them while a child starts, then raises them."""
    standalone = load_standalone()
    expected = standalone.Terminated if raised == "Terminated" else raised
    before = signal.signal(signal.SIGTERM, standalone._on_sigterm)
    child = None
    try:
        with pytest.raises(expected), standalone._signals_held():
            os.kill(os.getpid(), sig)
            time.sleep(0.1)  # Python runs the handler here: held, not raised
            child = "held"
        assert child == "held"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is standalone._on_sigterm
    finally:
        signal.signal(signal.SIGTERM, before)


# -- a plaintext bounded by its manifest (issue 21, item 8) ----------------------------------------
def zstd_bomb(size: int) -> bytes:
    """A valid zstd frame of `size` bytes of 'A', in raw-literal RLE blocks of 128 KiB: 4 bytes
    a block, so 4 GiB take 131 KB and 16 GiB 512 KiB."""
    block = 128 * 1024
    frame = bytearray(b"\x28\xb5\x2f\xfd\x00\x38")  # magic; no content size; a 128 KiB window
    count, rest = divmod(size, block)
    sizes = [block] * count + ([rest] if rest else [])
    for i, n in enumerate(sizes):
        frame += ((n << 3) | (1 << 1) | (i == len(sizes) - 1)).to_bytes(3, "little") + b"A"  # RLE block header, its byte
    return bytes(frame)


def test_a_zstd_bomb_is_stopped_at_the_size_its_manifest_promises(tmp_path):
    """16 GiB promised as 64 bytes: refused at once, nothing written."""
    encrypted = tmp_path / "bomb.sql.zst.encrypted"
    openssl_encrypt(encrypted, zstd_bomb(16 * 2**30))
    (tmp_path / "bomb.sql.zst.encrypted.manifest.json").write_text(json.dumps(manifest_for(encrypted, compression="zstd", plaintext_size=64)))
    began = time.monotonic()
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "out.sql")], env=env(), capture_output=True,
                          text=True, timeout=60)
    elapsed = time.monotonic() - began
    assert done.returncode == 1 and "more than the 64 bytes its manifest promises" in done.stderr, done.stderr
    assert error_lines(done.stderr) == done.stderr.splitlines()[-1:]
    assert elapsed < 3, f"{elapsed:.1f} s"  # PBKDF2 of the key_id and Python's start are most of it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.sql.zst.encrypted", "bomb.sql.zst.encrypted.manifest.json"]


def test_without_a_manifest_the_output_is_bounded_by_a_ratio(tmp_path):
    """The issue's 131 KB plant that expands to 4 GiB: stopped at --max-ratio (default 1000) times
    the input, loudly, nothing left; a larger --max-ratio lets a genuine repetitive dump through."""
    encrypted = tmp_path / "plant.sql.zst.encrypted"
    openssl_encrypt(encrypted, zstd_bomb(4 * 2**30))
    assert 131_000 < len(zstd_bomb(4 * 2**30)) < 132_000
    began = time.monotonic()
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "out.sql")], env=env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "more than 1000 times its own size" in done.stderr and "--max-ratio" in done.stderr, done.stderr
    assert time.monotonic() - began < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plant.sql.zst.encrypted"]

    repetitive = tmp_path / "genuine.sql.zst.encrypted"
    sql = b"INSERT INTO t VALUES (1);\n" * 400_000 + b"--\n-- PostgreSQL database dump complete\n--\n"
    openssl_encrypt(repetitive, subprocess.run(["zstd", "-19", "-q", "-c"], input=sql, capture_output=True, check=True).stdout)
    ratio = len(sql) / repetitive.stat().st_size
    done = subprocess.run([*DECRYPT, "-i", str(repetitive), "-o", str(tmp_path / "g.sql"), "--max-ratio", str(int(ratio / 2))],
                          env=env(), capture_output=True, text=True)
    assert done.returncode == 1 and not (tmp_path / "g.sql").exists()
    subprocess.run([*DECRYPT, "-i", str(repetitive), "-o", str(tmp_path / "g.sql"), "--max-ratio", str(int(ratio * 2))],
                   env=env(), check=True, capture_output=True)
    assert (tmp_path / "g.sql").read_bytes() == sql


def test_an_aescrypt_archive_larger_than_its_manifest_says_is_stopped_there(tmp_path):
    encrypted = tmp_path / "x.zip.encrypted"
    aescrypt_encrypt(encrypted, PLAIN)
    (tmp_path / "x.zip.encrypted.manifest.json").write_text(json.dumps(manifest_for(encrypted, plaintext_size=1000)))
    done = subprocess.run([*DECRYPT, "-i", str(encrypted), "-o", str(tmp_path / "out.zip")], env=env(), capture_output=True, text=True)
    assert done.returncode == 1 and "more than the 1000 bytes its manifest promises" in done.stderr, done.stderr
    assert not (tmp_path / "out.zip").exists()


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "fallback"])
def test_the_output_has_no_name_until_it_is_published(tmp_path, monkeypatch, unnamed):
    """In process: with O_TMPFILE nothing shows in OUT's directory until publish(); where the
    filesystem cannot make unnamed files, a hidden 0600 file that discard() removes."""
    standalone = load_standalone()
    if not unnamed:
        monkeypatch.delattr(standalone.os, "O_TMPFILE")
    out = standalone.Output(str(tmp_path / "out.sql"), limit=10)
    out.write(b"0123456789")
    with pytest.raises(standalone.TooLarge):
        out.write(b"x")
    seen = [p.name for p in tmp_path.iterdir()]
    assert seen == [] if unnamed else (len(seen) == 1 and seen[0].startswith(".decrypt-"))
    out.publish(force=False)
    out.discard()
    assert [p.name for p in tmp_path.iterdir()] == ["out.sql"]
    assert (tmp_path / "out.sql").read_bytes() == b"0123456789" and (tmp_path / "out.sql").stat().st_mode & 0o777 == 0o600
    again = standalone.Output(str(tmp_path / "out.sql"), limit=10)
    with pytest.raises(standalone.Failure, match="exists"):
        again.publish(force=False)
    again.publish(force=True)
    again.discard()
    assert [p.name for p in tmp_path.iterdir()] == ["out.sql"] and (tmp_path / "out.sql").read_bytes() == b""
