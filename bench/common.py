"""What every benchmark part shares: measuring one run of a contender (wall, CPU, memory, disk),
running contenders alternately, the S3 endpoint in its own process, and writing bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dev.harness import REPO, PostgresCluster, free_port
from dev.measure import TreeMemory

BIN = Path(sys.executable).parent  # the venv's bin: moto_server, aws, pyAesCrypt
PY = sys.executable
PASSPHRASE = "bench-Passphrase-7f3a-not-secret"
RESULTS = REPO / "bench" / "RESULTS.md"
MIB = 1024 * 1024


# -- measuring one run ---------------------------------------------------------------------------
def _self_write_bytes() -> int:
    # A reaped child's I/O counters are added to its parent's, up to us: the delta over one run
    # is everything the contender's whole process tree wrote to block devices.
    with open("/proc/self/io") as io_file:
        for line in io_file:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


@dataclass
class Run:
    seconds: float
    cpu: float
    tree_kib: int
    process_kib: int
    written: int
    plaintext: int
    ok: bool
    error: str = ""
    stored: int = 0  # bytes the run left in the bucket (its contender's prefix), when measured


def measure(argv: list[str], env: dict[str, str], plaintext_paths: list[Path] = ()) -> Run:
    before = _self_write_bytes()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    with TreeMemory(proc.pid) as memory:
        _, stderr = proc.communicate()
    seconds = time.monotonic() - began
    written = _self_write_bytes() - before
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # every reaped descendant's, like write_bytes
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    plaintext = sum(_tree_size(p) for p in plaintext_paths)
    error = "" if proc.returncode == 0 else f"exit {proc.returncode}: {stderr.decode(errors='replace')[-600:]}"
    return Run(seconds, cpu, memory.peak_tree_kib, memory.peak_process_kib, written, plaintext, proc.returncode == 0, error)


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


@dataclass
class Contender:
    name: str
    note: str
    command: object  # callable(rep) -> (argv, env, plaintext paths)
    prefix: str | None = None  # where its runs store their output in the bench bucket
    runs: list[Run] = field(default_factory=list)

    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    def median(self, attr: str) -> float | None:
        runs = self.ok_runs()
        return statistics.median(getattr(r, attr) for r in runs) if runs else None

    def peak(self, attr: str) -> int | None:
        runs = self.ok_runs()
        return max(getattr(r, attr) for r in runs) if runs else None


def alternate(contenders: list[Contender], reps: int, cleanup=None, stored=None) -> None:
    """Every contender once per repetition, in turn; `stored(prefix)` (bytes in the bucket under a
    contender's prefix) is noted after each run, before `cleanup()`."""
    for rep in range(reps):
        for contender in contenders:
            argv, env, plaintext_paths = contender.command(rep)
            run = measure(argv, env, plaintext_paths)
            if stored and contender.prefix:
                run.stored = stored(contender.prefix)
            contender.runs.append(run)
            state = "ok" if run.ok else "FAILED " + run.error
            print(f"  {contender.name:<34} rep {rep + 1}: {run.seconds:6.1f} s, cpu {run.cpu:6.1f} s, tree {run.tree_kib / 1024:6.0f} MiB, "
                  f"wrote {run.written / MIB:7.1f} MiB  {state}", file=sys.stderr, flush=True)
            if cleanup:
                cleanup()


# -- services ------------------------------------------------------------------------------------
class MotoProcess:
    """moto's S3 server in its own process (not a child of any contender)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoProcess:
        # bench/moto_server.py: moto's server without its listings' copy of every object's bytes
        self.proc = subprocess.Popen([PY, "-m", "bench.moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing-secret", config=Config(max_pool_connections=16))


def empty_bucket(client, bucket: str) -> None:
    """Delete every object (the bench bucket is unversioned): moto keeps them in its memory."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


def profile(argv: list[str], env: dict[str, str], work: Path, top: int = 12) -> list[str]:
    """Run one command under py-spy (sampling, non-blocking) and tabulate where its Python threads
    spent their non-idle samples, by innermost frame (its function and file, lines merged)."""
    spy = BIN / "py-spy"
    if not spy.exists():
        return ["py-spy is not installed in the venv (pip install -r requirements-dev.txt): no profile.", ""]
    raw = work / "profile.txt"
    raw.unlink(missing_ok=True)
    subprocess.run([str(spy), "record", "--nonblocking", "--rate", "200", "--format", "raw", "-o", str(raw), "--", *argv],
                   env=env, cwd=REPO, capture_output=True, check=False)
    if not raw.exists():
        return ["py-spy produced no profile (ptrace not permitted?).", ""]
    leaves: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = re.sub(r":\d+\)$", ")", stack.split(";")[-1].strip())
        leaves[leaf] = leaves.get(leaf, 0) + int(count)
        total += int(count)
    rows = ["| innermost frame | share of samples |", "|---|---:|"]
    for leaf, count in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
        rows.append(f"| `{leaf}` | {count / total:.0%} |")
    return [f"{total} non-idle samples at 200 Hz over all threads (py-spy record --nonblocking).", "", *rows, ""]


# -- report ---------------------------------------------------------------------------------------------
def _cmd(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def machine(pg: PostgresCluster | None) -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    import moto

    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem / MIB:.1f} GiB; kernel {platform.release()}",
        f"- Python {platform.python_version()}; {_cmd([str(pg.bin / 'pg_dump'), '--version']) if pg else 'PostgreSQL: -'}; "
        f"{_cmd(['openssl', 'version'])}; {_cmd([str(BIN / 'aws'), '--version'])}; moto {moto.__version__} (separate process)",
    ]


def _mib(kib_or_bytes: float | None, unit: int) -> str:
    return "-" if kib_or_bytes is None else f"{kib_or_bytes / unit:,.0f}"


def cell(text: str) -> str:
    """Text for a Markdown table cell (contender names hold shell pipes)."""
    return text.replace("|", "\\|")


def table(contenders: list[Contender]) -> list[str]:
    ours = contenders[0] if contenders and contenders[0].name.startswith("ours") else None
    rows = ["| contender | median wall (s) | runs (s) | median CPU, tree (s) | peak tree RSS (MiB) | peak process (MiB) | disk writes, tree (MiB) "
            "| plaintext on disk (MiB) | wall ÷ ours | RSS ÷ ours | note |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in contenders:
        wall, tree = c.median("seconds"), c.peak("tree_kib")
        runs = ", ".join(f"{r.seconds:.1f}" if r.ok else "FAILED" for r in c.runs)
        ratio = lambda mine, theirs: "-" if not (mine and theirs) else f"{mine / theirs:.2f}"  # noqa: E731
        name, note = cell(c.name), cell(c.note)
        cpu = c.median("cpu")
        rows.append(f"| {name} | {'-' if wall is None else f'{wall:.1f}'} | {runs} | {'-' if cpu is None else f'{cpu:.1f}'} | {_mib(tree, 1024)} | "
                    f"{_mib(c.peak('process_kib'), 1024)} | {_mib(c.median('written'), MIB)} | {_mib(c.peak('plaintext'), MIB)} | "
                    f"{ratio(wall, ours and ours.median('seconds'))} | {ratio(tree, ours and ours.peak('tree_kib'))} | {note} |")
    return rows


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def write_section(name: str, lines: list[str]) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmark results\n\nWritten by `make bench` (`python -m bench.run`); see bench/README.md for the columns.\n\n"
        "<!-- quick:begin -->\n<!-- quick:end -->\n\n<!-- full:begin -->\n<!-- full:end -->\n")
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    RESULTS.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)


def clear(work: Path) -> None:
    for child in work.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
