"""Encryption throughput of the files path: pyAesCrypt through FullReader against the limit
`openssl speed` sets for AES-256-CBC followed by HMAC-SHA256 on one core."""

from __future__ import annotations

import io
import os
import re
import statistics
import subprocess
import time

from backupkit.crypto import AESCRYPT_BUFFER, FullReader  # scripts/ is on PYTHONPATH (make bench)

from .common import MIB, PASSPHRASE


class NullSink:
    def write(self, data: bytes) -> int:
        return len(data)


def openssl_speed(algorithm: list[str]) -> float:
    """Bytes per second for the largest block size `openssl speed` reports."""
    # openssl speed divides by its user CPU time: the figure does not depend on the machine's load.
    out = subprocess.run(["openssl", "speed", "-seconds", "2", *algorithm], capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if ln.strip() and re.search(r"\d+\.\d+k\s*$", ln)][-1]
    return float(line.split()[-1].rstrip("k")) * 1000


def crypto_throughput(mib: int) -> dict[str, float]:
    import pyAesCrypt

    data = os.urandom(mib * MIB)
    wall, cpu = [], []
    for _ in range(3):
        began, began_cpu = time.perf_counter(), time.thread_time()
        pyAesCrypt.encryptStream(FullReader(io.BytesIO(data)), NullSink(), PASSPHRASE, AESCRYPT_BUFFER)
        wall.append(time.perf_counter() - began)
        cpu.append(time.thread_time() - began_cpu)
    aes = openssl_speed(["-evp", "aes-256-cbc"])
    sha = openssl_speed(["sha256"])
    limit = 1 / (1 / aes + 1 / sha)  # CBC encryption and HMAC-SHA256 over it, one core, one after the other
    return {"ours": len(data) / statistics.median(cpu), "ours_wall": len(data) / statistics.median(wall),
            "aes": aes, "sha": sha, "limit": limit}
