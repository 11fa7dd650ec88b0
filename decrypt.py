#!/usr/bin/env python3
"""Decrypt an external backup: openssl `enc -aes-256-cbc -pbkdf2` (.sql.encrypted) or AES Crypt v2
(.zip.encrypted), recognised by their magic bytes.

Standalone on purpose (standard library + pyAesCrypt + the openssl binary): copy this one file
to any machine during an incident.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import typing

OPENSSL_ARGS = ["-aes-256-cbc", "-pbkdf2", "-md", "sha256", "-iter", "10000"]
KEY_ID_SALT = b"external-backups key id"
BUFFER = 1024 * 1024
# Never handed to openssl (it reads the passphrase from a pipe); same list as backupkit.config.
SECRET_VARIABLES = (
    "EXTERNAL_BACKUP_ENCRYPTION_KEY", "EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS", "DATABASE_URL", "TARGET_DATABASE_URL",
    "PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "SOURCE_AWS_SECRET_ACCESS_KEY", "SOURCE_AWS_SESSION_TOKEN",
)

EPILOG = """\
The passphrase comes from EXTERNAL_BACKUP_ENCRYPTION_KEY (and EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS,
comma-separated older ones), else from a prompt without echo. --password works too but puts the
passphrase in the process list: avoid it on shared machines.

When IN.manifest.json lies beside the input (fetch_backup.py puts it there), the encrypted and
plaintext SHA-256 are checked against it and the passphrase is chosen by its key_id.
On any failure nothing is left at OUT.

examples:
  export EXTERNAL_BACKUP_ENCRYPTION_KEY=…        # or let it prompt
  ./decrypt.py --filein backup.sql.encrypted --fileout database-backup.sql
  ./decrypt.py -i files.zip.encrypted -o files.zip
"""


class Failure(Exception):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised so the partial output is removed (and openssl killed) on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one `error:` line (after the usage) and exit 2, like the other scripts."""

    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def key_id(passphrase: str) -> str:
    return hashlib.pbkdf2_hmac("sha256", passphrase.encode(), KEY_ID_SALT, 600_000)[:8].hex()


def sha256_file(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(BUFFER):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def candidate_passphrases(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    found = [os.environ.get("EXTERNAL_BACKUP_ENCRYPTION_KEY", "")]
    found += os.environ.get("EXTERNAL_BACKUP_ENCRYPTION_KEY_PREVIOUS", "").split(",")
    found = [p for p in found if p]
    if not found and sys.stdin.isatty():
        found = [getpass.getpass("Backup passphrase: ")]
    if not found:
        raise Failure("no passphrase: set EXTERNAL_BACKUP_ENCRYPTION_KEY (or run on a terminal to be prompted)")
    return found


def decrypt_openssl(infile: str, outfile: str, passphrase: str) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, passphrase.encode() + b"\n")
    os.close(write_end)
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
    try:
        done = subprocess.run(
            ["openssl", "enc", "-d", *OPENSSL_ARGS, "-in", infile, "-out", outfile, "-pass", f"fd:{read_end}"],
            pass_fds=(read_end,), capture_output=True, text=True, env=env,
        )
    except FileNotFoundError:
        raise Failure("openssl: command not found (apt-get install openssl)") from None
    finally:
        os.close(read_end)
    if done.returncode != 0:
        detail = " ".join(done.stderr.split())[:300]
        raise ValueError(f"wrong passphrase or corrupted file (openssl: {detail})")


def decrypt_aescrypt(infile: str, outfile: str, passphrase: str) -> None:
    try:
        import pyAesCrypt
    except ImportError:
        raise Failure("pyAesCrypt is not installed: pip install pyAesCrypt") from None
    with open(infile, "rb") as source, open(outfile, "wb") as target:
        try:
            pyAesCrypt.decryptStream(source, target, passphrase, BUFFER)
        except ValueError as exc:
            raise ValueError(f"wrong passphrase or corrupted file ({exc})") from None


def check_looks_like_text(path: str) -> None:
    """openssl has no MAC: a wrong passphrase passes its padding check about once in 256 tries
    and yields noise. Our openssl backups are SQL dumps (UTF-8 text); without a manifest to check
    the hash against, noise is told from a dump this way."""
    with open(path, "rb") as handle:
        head = handle.read(64 * 1024)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise ValueError("wrong passphrase (the output is not the SQL text of a dump)") from None


def read_manifest(path: str | None) -> dict | None:
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as exc:
        raise Failure(f"cannot read the manifest {path}: {exc}") from None
    fields = ("encrypted_sha256", "plaintext_sha256", "key_id")
    if not isinstance(manifest, dict) or not all(isinstance(manifest.get(f), str) for f in fields):
        raise Failure(f"{path} is not a backup manifest (it lacks {', '.join(fields)})")
    return manifest


def decrypt(infile: str, outfile: str, passphrases: list[str], manifest: dict | None) -> str:
    """Decrypt infile to outfile (atomically); returns the format's name."""
    with open(infile, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"Salted__"):
        kind, function = "openssl aes-256-cbc", decrypt_openssl
    elif head.startswith(b"AES"):
        kind, function = "AES Crypt", decrypt_aescrypt
    elif not head:
        raise Failure(f"{infile} is empty: not a backup")
    else:
        raise Failure(f"{infile} is not an encrypted backup (it starts with neither 'Salted__' nor 'AES')")

    if manifest is not None:
        size, digest = sha256_file(infile)
        if digest != manifest["encrypted_sha256"] or size != manifest.get("encrypted_size", size):
            raise Failure(f"{infile} does not match its manifest (size {size}, SHA-256 {digest}): corrupted or truncated download")
        matching = [p for p in passphrases if key_id(p) == manifest["key_id"]]
        if not matching:
            raise Failure(f"this backup needs the passphrase with key_id {manifest['key_id']}; "
                          f"the passphrases given have key_id {', '.join(key_id(p) for p in passphrases)}")
        passphrases = matching

    directory = os.path.dirname(os.path.abspath(outfile))
    fd, temp = tempfile.mkstemp(prefix=".decrypt-", dir=directory)  # 0600
    os.close(fd)
    try:
        problems = []
        for passphrase in passphrases:
            try:
                function(infile, temp, passphrase)
                if function is decrypt_openssl and manifest is None:
                    check_looks_like_text(temp)
                break
            except ValueError as exc:
                problems.append(str(exc))
        else:
            tried = f" (tried {len(passphrases)} passphrases)" if len(passphrases) > 1 else ""
            raise Failure(f"cannot decrypt {infile}{tried}: {problems[-1]}")
        if manifest is not None and sha256_file(temp)[1] != manifest["plaintext_sha256"]:
            raise Failure(f"the decrypted data does not match the manifest's plaintext SHA-256: {infile} is corrupted")
        os.replace(temp, outfile)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="decrypt.py", description=__doc__.split("\n\n")[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-i", "--filein", "--infile", dest="infile", required=True, help="encrypted backup file")
    parser.add_argument("-o", "--fileout", "--outfile", dest="outfile", required=True, help="where to write the plaintext")
    parser.add_argument("-p", "--password", help="passphrase (visible to other users: prefer the environment)")
    parser.add_argument("--manifest", help="manifest to check against (default: INFILE.manifest.json when present)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if not os.path.isfile(args.infile):
            raise Failure(f"{args.infile}: no such file")
        if os.path.abspath(args.infile) == os.path.abspath(args.outfile):
            raise Failure("--fileout must differ from --filein")
        if args.password:
            print("warning: --password is visible in the process list; prefer EXTERNAL_BACKUP_ENCRYPTION_KEY", file=sys.stderr)
        manifest = read_manifest(args.manifest or args.infile + ".manifest.json")
        kind = decrypt(args.infile, args.outfile, candidate_passphrases(args.password), manifest)
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print("error: terminated (SIGTERM): nothing was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT): nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 1
    checked = " (checked against its manifest)" if manifest else ""
    print(f"decrypted {args.infile} ({kind}) to {args.outfile}{checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
