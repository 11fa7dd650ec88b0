"""Helpers for the files backup/restore tests: source buckets with awkward content, snapshots to
compare buckets byte for byte, a TCP proxy that can cut the source endpoint mid-run, and a runner
that measures a script's peak memory."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyAesCrypt

from dev.harness import REPO

# The scripts import their library as `backupkit`; so do the unit tests.
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

MIB = 1024 * 1024


@dataclass
class Obj:
    body: bytes
    content_type: str | None = None
    metadata: dict[str, str] | None = None


def new_bucket(s3server, prefix: str = "app-files") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    s3server.client().create_bucket(Bucket=name)
    return name


def fill(client, bucket: str, objects: dict[str, Obj], workers: int = 8) -> None:
    def put(item: tuple[str, Obj]) -> None:
        key, obj = item
        extra = {}
        if obj.content_type:
            extra["ContentType"] = obj.content_type
        if obj.metadata:
            extra["Metadata"] = obj.metadata
        client.put_object(Bucket=bucket, Key=key, Body=obj.body, **extra)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, objects.items()))


def awkward_objects(small: int = 2000, large_mib: int = 25) -> dict[str, Obj]:
    """Nested, unicode and spaced keys, empty objects, one object of several upload parts,
    many small ones, distinct content types and metadata."""
    objects = {
        "top.txt": Obj(b"top level\n", "text/plain; charset=utf-8", {"owner": "alice"}),
        "a/b/c/d/e/deep.json": Obj(b'{"deep": true}', "application/json", {"level": "5", "note": "x y"}),
        "unicodé/Zoë Ångström/李小龍.png": Obj(os.urandom(3000), "image/png", {"uploaded-by": "zoe"}),
        "with spaces/file name (1).pdf": Obj(os.urandom(70_000), "application/pdf", {"Original-Name": "File Name (1).pdf"}),
        "empty.bin": Obj(b"", "application/octet-stream"),
        "folder/": Obj(b""),
        "folder/empty-with-meta": Obj(b"", "text/plain", {"k": "v"}),
        "odd/chars/+%&=?;@#.txt": Obj(b"odd", "text/x-odd"),
        "big/large.bin": Obj(os.urandom(large_mib * MIB), "video/mp4", {"duration": "42"}),
    }
    for i in range(small):
        objects[f"many/{i % 10}/item-{i:05d}.txt"] = Obj(f"small object {i}\n".encode() * (1 + i % 5),
                                                          f"text/x-kind-{i % 3}", {"index": str(i)})
    return objects


def snapshot(client, bucket: str, prefix: str = "") -> dict[str, tuple[str, int, str | None, dict]]:
    """key → (sha256, size, ContentType, Metadata) for every object under prefix."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]

    def one(key: str):
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"].read()
        return key, (hashlib.sha256(body).hexdigest(), len(body), response.get("ContentType"), response.get("Metadata", {}))

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(one, keys))


def expected_snapshot(objects: dict[str, Obj], prefix: str = "") -> dict[str, tuple[str, int, str | None, dict]]:
    return {prefix + k: (hashlib.sha256(o.body).hexdigest(), len(o.body), o.content_type or "binary/octet-stream", lower(o.metadata))
            for k, o in objects.items()}


def lower(metadata: dict[str, str] | None) -> dict[str, str]:
    """S3 stores user metadata names in lower case."""
    return {k.lower(): v for k, v in (metadata or {}).items()}


def manifests(client, bucket: str) -> list[dict]:
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            if item["Key"].endswith(".manifest.json"):
                found.append(json.loads(client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()))
    return found


def download(client, bucket: str, key: str, path: Path) -> Path:
    path.write_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    return path


def decrypt_bytes(data: bytes, passphrase: str) -> bytes:
    import io

    out = io.BytesIO()
    pyAesCrypt.decryptStream(io.BytesIO(data), out, passphrase, 64 * 1024)
    return out.getvalue()


class CuttableProxy:
    """A TCP proxy to an S3 endpoint that can be cut: `cut()` stops listening and resets every
    open connection, as when the source endpoint goes away mid-run. Counts bytes sent back."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bytes_down = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._cut:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._cut:
                client.close()
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if down:
                    self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self._cut = True
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    # shutdown() wakes the proxy threads blocked in recv(); close() alone would not.
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


@dataclass
class Measured:
    returncode: int
    max_rss: int  # bytes, the script's peak resident memory
    seconds: float
    stdout: str
    stderr: str


def run_measured(runner, script: str, *args: str, env: dict | None = None, timeout: float = 900) -> Measured:
    """Run a script like `runner` does and return its peak RSS: the kernel's high-water mark
    (VmHWM), read until it exits. (os.wait4's ru_maxrss would not do: it survives exec, so it
    reports the forking test process's own size, moto's stored objects included.)"""
    merged = {k: v for k, v in {**runner.env, **(env or {})}.items() if v is not None}
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"measured-{uuid.uuid4().hex}"
    began = time.monotonic()
    peak = 0
    with open(f"{out_path}.out", "w+") as out, open(f"{out_path}.err", "w+") as err:
        proc = subprocess.Popen(runner.command(script, *args), env=merged, cwd=runner.cwd, stdout=out, stderr=err)
        status = Path(f"/proc/{proc.pid}/status")
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        while proc.poll() is None:
            try:
                if script.encode() in cmdline.read_bytes():  # after exec: the script's own memory
                    for line in status.read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            if time.monotonic() - began > timeout:
                proc.kill()
                raise AssertionError(f"{script} did not finish in {timeout} s")
            time.sleep(0.02)
        seconds = time.monotonic() - began
        out.seek(0)
        err.seek(0)
        result = Measured(proc.returncode, peak, seconds, out.read(), err.read())
    for suffix in (".out", ".err"):
        os.unlink(f"{out_path}{suffix}")
    return result
