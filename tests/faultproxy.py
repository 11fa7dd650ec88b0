"""A fault-injecting HTTP proxy in front of the S3 endpoint, for tests.

Scripts reach it through AWS_ENDPOINT_URL. Rules pick requests by S3 operation (UploadPart,
CompleteMultipartUpload, GetObject, …) and answer a seeded, bounded fraction of them with an S3
error, a connection reset (mid-request or mid-answer), a stall past the client's read timeout
(before or after the answer's headers), or take the whole endpoint down.
Faults are injected before the request reaches the real server, so S3 never saw a failed request.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "403-key": (403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
    "403-signature": (403, "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."),
    # What GetObject answers for one object the job cannot read: SSE-C without its key, a KMS key or a policy.
    "400-sse-c": (400, "InvalidRequest", "The object was stored using a form of Server Side Encryption. "
                                         "The correct parameters must be provided to retrieve the object."),
    "403-denied": (403, "AccessDenied", "Access Denied"),
}
FAULTS = (*ERRORS, "reset", "cut", "stall", "stall-body", "delay", "down")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "upgrade", "te"}


def operation(method: str, path: str) -> str:
    """The S3 operation of a path-style request (what botocore sends to an IP endpoint)."""
    parts = urlsplit(path)
    query = parse_qs(parts.query, keep_blank_values=True)
    segments = [s for s in parts.path.split("/") if s]
    on_object = len(segments) >= 2
    if method == "PUT":
        if "partNumber" in query and "uploadId" in query:
            return "UploadPart"
        if on_object:
            return "PutObjectRetention" if "retention" in query else "PutObject"
        return "PutBucket"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        return "Post"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    if method == "HEAD":
        return "HeadObject" if on_object else "HeadBucket"
    if method == "GET":
        if on_object:
            return "GetObjectRetention" if "retention" in query else "GetObject"
        if "versions" in query:
            return "ListObjectVersions"
        if "uploads" in query:
            return "ListMultipartUploads"
        return "ListObjects"
    return method


@dataclass
class Rule:
    """Answer `rate` of the requests for `operations` with `fault`.

    `after`: let that many matching requests through first. `limit`: inject at most that many
    faults. `per_request`: fault one request (same path) at most that many times, so a transient
    fault can never exhaust the client's retries. `seconds`: how long a stall or delay lasts.
    `path`: only requests whose path holds this (one object's key, URL-quoted).
    """

    operations: tuple[str, ...]
    fault: str
    rate: float = 1.0
    after: int = 0
    limit: int | None = None
    per_request: int | None = None
    seconds: float = 30.0
    path: str | None = None
    seen: int = 0
    injected: int = 0
    by_path: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}")
        if isinstance(self.operations, str):
            self.operations = (self.operations,)


class FaultProxy:
    """`with FaultProxy(upstream, seed=1) as proxy:` → `proxy.endpoint` for AWS_ENDPOINT_URL."""

    def __init__(self, upstream: str, seed: int = 0, rules: list[Rule] | None = None):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.rules: list[Rule] = list(rules or [])
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.log: list[tuple[str, str]] = []  # (operation, "forwarded NNN" | fault)
        self.paths: list[tuple[str, str]] = []  # (operation, request path), every request
        self.ranges: list[tuple[str, str, str]] = []  # (request path, Range, If-Match) of each ranged request
        self.down = False
        self.stopping = threading.Event()
        self.first = {}  # operation → threading.Event set when first seen
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def handle_one_request(self) -> None:
                if proxy.down:
                    self._reset()
                    return
                super().handle_one_request()

            def _dispatch(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _dispatch

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends RST, as a crashed load balancer would.
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                except OSError:
                    pass
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    # -- control ---------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if not self.down:
            self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, *operations: str, fault: str, **options: object) -> Rule:
        rule = Rule(tuple(operations), fault, **options)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def go_down(self) -> None:
        """The endpoint disappears: new connections are refused, open ones reset."""
        if self.down:
            return
        self.down = True
        threading.Thread(target=self.server.shutdown, daemon=True).start()
        self.server.socket.close()

    def seen(self, op: str) -> threading.Event:
        with self.lock:
            return self.first.setdefault(op, threading.Event())

    def count(self, op: str, outcome: str | None = None) -> int:
        with self.lock:
            return sum(1 for o, r in self.log if o == op and (outcome is None or r == outcome))

    def faults(self) -> Counter:
        with self.lock:
            return Counter(r for _, r in self.log if not r.startswith("forwarded"))

    # -- the work --------------------------------------------------------------------------
    def _choose(self, op: str, path: str) -> Rule | None:
        with self.lock:
            self.first.setdefault(op, threading.Event()).set()
            for rule in self.rules:
                if op not in rule.operations and "*" not in rule.operations:
                    continue
                if rule.path is not None and rule.path not in path:
                    continue
                rule.seen += 1
                if rule.seen <= rule.after:
                    continue
                if rule.limit is not None and rule.injected >= rule.limit:
                    continue
                if rule.per_request is not None and rule.by_path[path] >= rule.per_request:
                    continue
                if self.random.random() >= rule.rate:
                    continue
                rule.injected += 1
                rule.by_path[path] += 1
                return rule
        return None

    def _record(self, op: str, outcome: str) -> None:
        with self.lock:
            self.log.append((op, outcome))

    def _read_body(self, handler: BaseHTTPRequestHandler, limit: int | None = None) -> bytes:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += handler.rfile.read(size)
                handler.rfile.readline()
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length if limit is None else min(limit, length))

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        op = operation(handler.command, handler.path)
        with self.lock:
            self.paths.append((op, handler.path))
            if handler.headers.get("Range"):
                self.ranges.append((handler.path, handler.headers["Range"], handler.headers.get("If-Match", "")))
        rule = self._choose(op, handler.path)
        fault = rule.fault if rule else None
        if fault == "down":
            self._record(op, "down")
            self.go_down()
            handler._reset()
            return
        if fault == "reset":
            # Mid-body: half the request arrived, then the connection breaks.
            self._read_body(handler, limit=int(handler.headers.get("Content-Length") or 0) // 2)
            self._record(op, "reset")
            handler._reset()
            return
        body = self._read_body(handler)
        if fault in ERRORS:
            status, code, message = ERRORS[fault]
            self._record(op, fault)
            payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                       f"<RequestId>FAULT{time.monotonic_ns()}</RequestId></Error>").encode()
            handler.send_response(status)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(payload)
            return
        if fault == "stall":
            self._record(op, "stall")
            self.stopping.wait(rule.seconds)  # bounded: never past the rule's seconds or stop()
            handler._reset()
            return
        if fault == "delay":
            self._record(op, "delay")
            self.stopping.wait(rule.seconds)
        status, headers, payload = self._forward(handler, body)
        if fault in ("cut", "stall-body"):
            # Headers and half the body, then the connection breaks (a download cut short), or
            # first stalls past the client's read timeout.
            self._record(op, fault)
            handler.send_response(status)
            for name, value in headers:
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(payload[: len(payload) // 2])
            handler.wfile.flush()
            if fault == "stall-body":
                self.stopping.wait(rule.seconds)
            handler._reset()
            return
        self._record(op, f"forwarded {status}")
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(payload)

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send the request upstream as it came (Host and signature untouched); the whole answer."""
        connection = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            connection.putrequest(handler.command, handler.path, skip_host=True, skip_accept_encoding=True)
            for name, value in handler.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    connection.putheader(name, value)
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            payload = response.read()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
            # A HEAD answer has no body but says how long the object is.
            length = response.getheader("Content-Length", "0") if handler.command == "HEAD" else str(len(payload))
            return response.status, [*headers, ("Content-Length", length)], payload
        finally:
            connection.close()
