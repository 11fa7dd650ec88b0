"""Helpers for the files backup/restore tests: app buckets (`new_bucket`) filled with awkward
content (`Obj`, `fill`, `awkward_objects`), snapshots to compare buckets byte for byte (`snapshot`,
`expected_snapshot`), and reading what a files backup stored (`manifests`, `download`,
`decrypt_bytes`)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyAesCrypt

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


def awkward_objects(small: int = 1010, large_mib: int = 13) -> dict[str, Obj]:
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




# What a restore must give back besides the bytes: every attribute the files backup keeps.
HEAD_ATTRIBUTES = ("ContentType", "ContentDisposition", "CacheControl", "ContentEncoding", "ContentLanguage",
                   "Metadata", "ContentLength", "ETag")


def heads(client, bucket: str, prefix: str = "") -> dict[str, tuple[str, dict]]:
    """key → (sha256, the attributes HeadObject returns) for every object under prefix."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]

    def one(key: str):
        head = client.head_object(Bucket=bucket, Key=key)
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return key, (hashlib.sha256(body).hexdigest(), {name: head.get(name) for name in HEAD_ATTRIBUTES})

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(one, keys))


def put_raw(endpoint: str, bucket: str, key: str, body: bytes, headers: dict[str, bytes]) -> None:
    """A PutObject whose header values go out as the bytes given (UTF-8 from an SDK that does not
    refuse non-ASCII metadata, as botocore does); the local endpoint does not check signatures."""
    import http.client
    from urllib.parse import quote, urlsplit

    where = urlsplit(endpoint)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        connection.putrequest("PUT", f"/{bucket}/{quote(key, safe='/')}")
        for name, value in {**headers, "Content-Length": str(len(body)).encode()}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        assert response.status == 200, response.read()
    finally:
        connection.close()
