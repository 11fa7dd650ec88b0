"""`make bench`: our backups and restore against the approaches they replace, on this machine.

Sets up a real PostgreSQL database (pgbench -i -s N plus a jsonb/bytea table) and source buckets
on a local S3 endpoint (moto's server, run as a separate process so its memory and CPU are not
counted), runs every contender several times, alternating, and writes bench/RESULTS.md.
See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dev.harness import REPO, PostgresCluster, free_port
from dev.measure import TreeMemory

sys.path.insert(0, str(REPO / "scripts"))
from backupkit.crypto import AESCRYPT_BUFFER, FullReader  # noqa: E402

BIN = Path(sys.executable).parent  # the venv's bin: moto_server, aws, pyAesCrypt
PY = sys.executable
PASSPHRASE = "bench-Passphrase-7f3a-not-secret"
RESULTS = REPO / "bench" / "RESULTS.md"
MIB = 1024 * 1024
BLOB_ROW_BYTES = 32 * 1024  # one bench_blobs payload; 64 KiB of hex in the dump


@dataclass
class Size:
    name: str
    pgbench_scale: int
    blob_mib: int
    buckets: list[tuple[int, int]]  # (total MiB, object count) per source bucket
    reps: int
    crypto_mib: int


SIZES = {
    # ≈ 300 MB dump, 128/256 MiB buckets: a few minutes in all.
    "quick": Size("quick", 20, 50, [(128, 256), (256, 512)], 2, 128),
    # ≈ 1 GB dump (pgbench 70 ≈ 0.66 GB + 170 MiB of bytea ≈ 0.36 GB of hex), 1 and 2 GiB buckets.
    "full": Size("full", 70, 170, [(1024, 2048), (2048, 4096)], 3, 512),
}


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
    runs: list[Run] = field(default_factory=list)

    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    def median(self, attr: str) -> float | None:
        runs = self.ok_runs()
        return statistics.median(getattr(r, attr) for r in runs) if runs else None

    def peak(self, attr: str) -> int | None:
        runs = self.ok_runs()
        return max(getattr(r, attr) for r in runs) if runs else None


def alternate(contenders: list[Contender], reps: int, cleanup=None) -> None:
    for rep in range(reps):
        for contender in contenders:
            argv, env, plaintext_paths = contender.command(rep)
            run = measure(argv, env, plaintext_paths)
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
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


# -- the database part -----------------------------------------------------------------------------
BLOBS_SQL = """
CREATE TABLE bench_blobs (id bigserial PRIMARY KEY, doc jsonb NOT NULL, payload bytea NOT NULL);
INSERT INTO bench_blobs (doc, payload)
SELECT jsonb_build_object('n', i, 'name', 'object-' || i, 'tags', jsonb_build_array('a', 'ß', i % 7), 'at', now()),
       decode(repeat(md5(i::text), {repeat}), 'hex')
FROM generate_series(1, {rows}) AS i;
ANALYZE;
"""


def make_database(pg: PostgresCluster, size: Size) -> str:
    pg.create_database("benchsrc")
    subprocess.run([str(pg.bin / "pgbench"), "-i", "-q", "-s", str(size.pgbench_scale), "-h", "127.0.0.1", "-p", str(pg.port),
                    "-U", pg.user, "benchsrc"], env=pg.env(), check=True, capture_output=True)
    pg.psql(BLOBS_SQL.format(repeat=BLOB_ROW_BYTES // 16, rows=size.blob_mib * MIB // BLOB_ROW_BYTES), "benchsrc")
    return "benchsrc"


def pg_dump_cmd(pg: PostgresCluster, database: str) -> str:
    return (f"{pg.bin / 'pg_dump'} --format=plain --clean --if-exists --no-owner --no-privileges "
            f"-h 127.0.0.1 -p {pg.port} -U {pg.user} -d {database}")


OPENSSL_ENC = "openssl enc -aes-256-cbc -pbkdf2 -md sha256 -iter 10000 -pass env:BENCH_KEY"


def database_contenders(pg: PostgresCluster, moto: MotoProcess, bucket: str, work: Path, compare: Path | None = None) -> list[Contender]:
    base = {**os.environ, **moto.env(), "PYTHONDONTWRITEBYTECODE": "1"}
    shell_env = {**base, "PGPASSWORD": pg.password, "BENCH_KEY": PASSPHRASE}
    dump = pg_dump_cmd(pg, "benchsrc")
    aws = f"{BIN / 'aws'} --endpoint-url {moto.endpoint} --only-show-errors s3 cp"

    def ours(rep):
        env = {**base, "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE, "DATABASE_URL": pg.url("benchsrc")}
        return [PY, "scripts/backup_database.py", "--environment", "bench", "--bucket", bucket, "--pg-dump", str(pg.bin / "pg_dump")], env, []

    def ours_at(rep):
        argv, env, paths = ours(rep)
        return [PY, str(compare / "scripts" / "backup_database.py"), *argv[2:]], env, paths

    def three_step(rep):
        plain, enc = work / "dump.sql", work / "dump.sql.enc"
        script = (f"set -e; {dump} -f {plain}; {OPENSSL_ENC} -in {plain} -out {enc}; "
                  f"{aws} {enc} s3://{bucket}/three-step/{rep}.sql.encrypted")
        return ["bash", "-c", script], shell_env, [plain]

    def one_line(rep):
        script = f"{dump} | {OPENSSL_ENC} | {aws} - s3://{bucket}/pipe/{rep}.sql.encrypted"
        return ["sh", "-c", script], shell_env, []

    def floor(rep):
        return ["sh", "-c", f"{dump} > /dev/null"], shell_env, []

    return [
        Contender("ours: backup_database.py", "pg_dump → openssl → streamed multipart; completes only if all exited 0", ours),
        *([Contender(f"ours at {compare}", "the same script from another checkout (--compare-scripts)", ours_at)] if compare else []),
        Contender("three-step: pg_dump -f, openssl, aws s3 cp", "writes the plaintext dump (and the ciphertext) to disk", three_step),
        Contender("one-line pipe: pg_dump | openssl | aws s3 cp -", "UNSAFE: completes the object even when pg_dump fails", one_line),
        Contender("floor: pg_dump > /dev/null", "no encryption, no upload", floor),
    ]


def restore_contenders(pg: PostgresCluster, moto: MotoProcess, bucket: str, work: Path, compare: Path | None = None) -> list[Contender]:
    """Both restore the same dump into a fresh database: ours from our encrypted backup (with its
    manifest) on local disk, psql from the plain SQL file on local disk."""
    client = moto.client()
    env = {**os.environ, **moto.env(), "PYTHONDONTWRITEBYTECODE": "1", "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE}
    done = subprocess.run([PY, "scripts/backup_database.py", "--environment", "restore-src", "--bucket", bucket, "--json",
                           "--pg-dump", str(pg.bin / "pg_dump")], env={**env, "DATABASE_URL": pg.url("benchsrc")},
                          cwd=REPO, capture_output=True, text=True, check=True)
    import json

    key = json.loads(done.stdout)["key"]
    encrypted = work / "backup.sql.encrypted"
    client.download_file(bucket, key, str(encrypted))
    client.download_file(bucket, key + ".manifest.json", str(encrypted) + ".manifest.json")
    plain = work / "plain.sql"
    subprocess.run(["openssl", "enc", "-d", *"-aes-256-cbc -pbkdf2 -md sha256 -iter 10000 -pass env:BENCH_KEY".split(),
                    "-in", str(encrypted), "-out", str(plain)], env={**os.environ, "BENCH_KEY": PASSPHRASE}, check=True)
    empty_bucket(client, bucket)

    def ours(rep):
        target = f"restore_ours_{rep}"
        pg.create_database(target)
        return [PY, "scripts/restore_database.py", "--file", str(encrypted), "--target-database-url", pg.url(target),
                "--psql", str(pg.bin / "psql")], env, []

    def ours_at(rep):
        argv, env_, paths = ours(rep)
        return [PY, str(compare / "scripts" / "restore_database.py"), *argv[2:]], env_, paths

    def psql_file(rep):
        target = f"restore_psql_{rep}"
        pg.create_database(target)
        return [str(pg.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-h", "127.0.0.1",
                "-p", str(pg.port), "-U", pg.user, "-d", target, "-f", str(plain)], {**os.environ, "PGPASSWORD": pg.password}, []

    return [
        Contender("ours: restore_database.py --file", "checks manifest, openssl -d → psql --single-transaction, holds back the tail", ours),
        *([Contender(f"ours at {compare}", "the same script from another checkout (--compare-scripts)", ours_at)] if compare else []),
        Contender("psql -f plain.sql", "plaintext dump on disk, no verification", psql_file),
    ]


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


# -- the files part ----------------------------------------------------------------------------------
def fill_bucket(client, bucket: str, total_mib: int, count: int) -> None:
    client.create_bucket(Bucket=bucket)
    per = total_mib * MIB // count
    kinds = [("pdf", "application/pdf"), ("png", "image/png"), ("csv", "text/csv"), ("json", "application/json")]

    def put(i: int) -> None:
        ext, ctype = kinds[i % len(kinds)]
        size = per + (i % 7 - 3) * 1024 if per > 8192 else per  # not all the same size
        client.put_object(Bucket=bucket, Key=f"uploads/{i % 50:02d}/document-{i:06d}.{ext}", Body=os.urandom(size),
                          ContentType=ctype, Metadata={"uploaded-by": f"user-{i % 13}"})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(count)))


def files_contenders(moto: MotoProcess, source: str, bucket: str, work: Path, ours_script: Path | None) -> list[Contender]:
    base = {**os.environ, **moto.env(), "PYTHONDONTWRITEBYTECODE": "1"}
    aws = f"{BIN / 'aws'} --endpoint-url {moto.endpoint} --only-show-errors s3"

    def ours(rep):
        env = {**base, "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE}
        return [PY, str(ours_script), "--environment", "bench", "--source-bucket", source, "--bucket", bucket], env, []

    def in_memory(rep):
        env = {**base, "EXTERNAL_BACKUP_ENCRYPTION_KEY": PASSPHRASE}
        return [PY, "bench/inmemory_files_backup.py", "--source-bucket", source, "--bucket", bucket,
                "--key", f"inmemory/{rep}.zip.encrypted"], env, []

    def sync_zip(rep):
        tree, archive = work / "sync", work / "files.zip"
        # The stock pyAesCrypt CLI only takes its password on argv (-p): acceptable in this bench
        # with a throwaway passphrase, never in production.
        script = (f"set -e; rm -rf {tree} {archive}*; {aws} sync s3://{source} {tree}; cd {tree}; zip -0 -r -q {archive} .; "
                  f'{BIN / "pyAesCrypt"} -e {archive} -p "$BENCH_KEY" -o {archive}.aes; '
                  f"{aws} cp {archive}.aes s3://{bucket}/sync-zip/{rep}.zip.encrypted")
        return ["bash", "-c", script], {**base, "BENCH_KEY": PASSPHRASE}, [tree, archive]

    contenders = []
    if ours_script:
        contenders.append(Contender("ours: backup_files.py", "list → ZIP → AES Crypt → streamed multipart", ours))
    contenders += [
        Contender("in-memory (replaced): ZIP+encrypt in BytesIO", "bench/inmemory_files_backup.py; memory grows with the bucket", in_memory),
        Contender("aws s3 sync + zip -0 + pyAesCrypt CLI + cp", "bucket, ZIP and ciphertext on disk; password on argv", sync_zip),
    ]
    return contenders


# -- encryption throughput ----------------------------------------------------------------------------
class NullSink:
    def write(self, data: bytes) -> int:
        return len(data)


def openssl_speed(algorithm: list[str]) -> float:
    """Bytes per second for the largest block size `openssl speed` reports."""
    # openssl speed divides by its user CPU time: the figure does not depend on the machine's load.
    out = subprocess.run(["openssl", "speed", "-seconds", "2", *algorithm], capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if ln.strip() and re.search(r"\d+\.\d+k\s*$", ln)][-1]
    return float(line.split()[-1].rstrip("k")) * 1000


def crypto_throughput(size: Size) -> dict[str, float]:
    import pyAesCrypt

    data = os.urandom(size.crypto_mib * MIB)
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


def table(contenders: list[Contender]) -> list[str]:
    ours = contenders[0] if contenders and contenders[0].name.startswith("ours") else None
    rows = ["| contender | median wall (s) | runs (s) | median CPU, tree (s) | peak tree RSS (MiB) | peak process (MiB) | disk writes, tree (MiB) "
            "| plaintext on disk (MiB) | wall ÷ ours | RSS ÷ ours | note |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in contenders:
        wall, tree = c.median("seconds"), c.peak("tree_kib")
        runs = ", ".join(f"{r.seconds:.1f}" if r.ok else "FAILED" for r in c.runs)
        ratio = lambda mine, theirs: "-" if not (mine and theirs) else f"{mine / theirs:.2f}"  # noqa: E731
        name, note = c.name.replace("|", "\\|"), c.note.replace("|", "\\|")
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


# -- main -------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 2 repetitions (a few minutes)")
    p.add_argument("--parts", default="db,restore,files,crypto", help="comma-separated subset of db,restore,files,crypto")
    p.add_argument("--reps", type=int, help="repetitions (default: 2 quick, 3 full)")
    p.add_argument("--scale", type=int, help="pgbench scale (default: 20 quick, 70 full)")
    p.add_argument("--blob-mib", type=int, help="MiB of bytea in bench_blobs (default: 50 quick, 170 full)")
    p.add_argument("--buckets", help="source buckets as MIB:COUNT,... (default: 128:256,256:512 quick, 1024:2048,2048:4096 full)")
    p.add_argument("--files-script", type=Path, help="backup_files.py to run as 'ours' (default: scripts/backup_files.py, when present)")
    p.add_argument("--profile", action="store_true", help="also run ours once under py-spy and tabulate its profile")
    p.add_argument("--compare-scripts", type=Path, help="a checkout whose scripts/ also run as a contender, e.g. before a fix")
    p.add_argument("--note", default="", help="a line for RESULTS.md, e.g. what else was running")
    p.add_argument("--label", help="section of RESULTS.md to write (default: quick or full)")
    args = p.parse_args(argv)

    size = SIZES["quick" if args.quick else "full"]
    size.reps = args.reps or size.reps
    size.pgbench_scale = args.scale or size.pgbench_scale
    size.blob_mib = args.blob_mib if args.blob_mib is not None else size.blob_mib
    if args.buckets:
        size.buckets = [tuple(int(x) for x in b.split(":")) for b in args.buckets.split(",")]
    parts = set(args.parts.split(","))
    files_script = args.files_script or (REPO / "scripts" / "backup_files.py")
    files_script = files_script.resolve() if files_script.exists() else None

    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/var/tmp"))  # a disk, not tmpfs: its writes must count
    pg = PostgresCluster().start() if parts & {"db", "restore"} else None
    moto = MotoProcess().start()
    client = moto.client()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    loads: list[float] = []
    sampler_stop = threading.Event()

    def sample_load() -> None:
        while not sampler_stop.wait(5):
            loads.append(os.getloadavg()[0])

    threading.Thread(target=sample_load, daemon=True).start()
    out: list[str] = []
    targets: list[str] = []
    label = args.label or size.name

    def save(final: bool) -> None:
        # After every part, so a run that is killed keeps what it measured.
        load_end = os.getloadavg()
        minutes = (time.monotonic() - began) / 60
        header = [f"## {label}: {started}, {minutes:.1f} minutes{'' if final else ' (incomplete: still running or stopped)'}", "",
                  *machine(pg), f"- Load average (1 min): {load_start[0]:.1f} at start, {load_end[0]:.1f} at end, "
                  f"median {statistics.median(loads) if loads else load_end[0]:.1f} during the run, on {os.cpu_count()} cores: "
                  "the bench's own processes (moto, the contender running) count in it; anything well above 2 "
                  "means other work shared the machine and wall times carry that noise.",
                  *([f"- Note: {args.note}"] if args.note else []), ""]
        if targets:
            header += ["### Targets", "", "| target | measured | verdict |", "|---|---:|---|", *targets, ""]
        write_section(label, header + out)

    try:
        if pg:
            print(f"setting up the database: pgbench -s {size.pgbench_scale} + {size.blob_mib} MiB of bytea", file=sys.stderr)
            make_database(pg, size)
            dump_bytes = int(subprocess.run(["sh", "-c", f"{pg_dump_cmd(pg, 'benchsrc')} | wc -c"], env={**os.environ, "PGPASSWORD": pg.password},
                                            capture_output=True, text=True, check=True).stdout)
            out.append(f"Database: pgbench scale {size.pgbench_scale} + bench_blobs (jsonb + {size.blob_mib} MiB bytea): "
                       f"plain dump {dump_bytes / MIB:,.0f} MiB. {size.reps} repetitions, contenders alternating.\n")
        if "db" in parts:
            print("database backup:", file=sys.stderr)
            db = database_contenders(pg, moto, bucket, work, args.compare_scripts)
            alternate(db, size.reps, cleanup=lambda: (empty_bucket(client, bucket), _clear(work)))
            out += ["### Database backup", "", *table(db), ""]
            if args.profile:
                print("profiling ours", file=sys.stderr)
                argv_, env_, _ = db[0].command(0)
                out += ["#### Profile of ours (one extra run)", "", *profile(argv_, env_, work)]
                empty_bucket(client, bucket)
            ours, three, pipe = db[0], db[-3], db[-2]
            if ours.ok_runs():
                r3 = ours.median("seconds") / pipe.median("seconds") if pipe.ok_runs() else None
                r2 = ours.median("seconds") / three.median("seconds") if three.ok_runs() else None
                rss = ours.peak("tree_kib") / 1024
                targets += [
                    f"| database: wall ≤ 1.05 × one-line pipe | {r3:.2f} × | {verdict(r3 <= 1.05) if r3 else 'n/a'} |",
                    f"| database: wall ≤ 0.7 × three-step | {r2:.2f} × | {verdict(r2 <= 0.7) if r2 else 'n/a'} |",
                    f"| database: peak tree RSS ≤ 100 MiB (target set for a 1 GB dump; this dump {dump_bytes / MIB:,.0f} MiB) "
                    f"| {rss:.0f} MiB | {verdict(rss <= 100)} |",
                    f"| database: 0 bytes of plaintext on disk | {ours.peak('plaintext')} B plaintext files; "
                    f"{ours.median('written') / 1024:,.0f} KiB written by the whole tree "
                    f"| {verdict(ours.peak('plaintext') == 0 and ours.median('written') < MIB)} |",
                ]
            save(final=False)
        if "restore" in parts:
            print("restore:", file=sys.stderr)
            rs = restore_contenders(pg, moto, bucket, work, args.compare_scripts)
            alternate(rs, size.reps)
            for rep in range(size.reps):
                pg.drop_database(f"restore_ours_{rep}")
                pg.drop_database(f"restore_psql_{rep}")
            out += ["### Restore (same dump, fresh database each run)", "", *table(rs), ""]
            if args.profile:
                print("profiling ours", file=sys.stderr)
                argv_, env_, _ = rs[0].command(size.reps)
                out += ["#### Profile of ours (one extra run)", "", *profile(argv_, env_, work)]
                pg.drop_database(f"restore_ours_{size.reps}")
            if rs[0].ok_runs() and rs[-1].ok_runs():
                r = rs[0].median("seconds") / rs[-1].median("seconds")
                targets.append(f"| restore: wall ≤ 1.15 × psql -f | {r:.2f} × | {verdict(r <= 1.15)} |")
            _clear(work)
            save(final=False)
        if "files" in parts:
            if not files_script:
                out.append("Files backup: scripts/backup_files.py is not in this tree yet; the other contenders ran alone.\n")
            file_rss: list[float] = []
            for total_mib, count in size.buckets:
                source = f"source-{total_mib}m-{uuid.uuid4().hex[:6]}"
                print(f"files backup: filling s3://{source} with {count} objects, {total_mib} MiB", file=sys.stderr)
                fill_bucket(client, source, total_mib, count)
                fc = files_contenders(moto, source, bucket, work, files_script)
                alternate(fc, size.reps, cleanup=lambda: (empty_bucket(client, bucket), _clear(work)))
                empty_bucket(client, source)
                client.delete_bucket(Bucket=source)
                out += [f"### Files backup: {total_mib} MiB in {count} objects", "", *table(fc), ""]
                if args.profile and files_script:
                    argv_, env_, _ = fc[0].command(0)
                    out += ["#### Profile of ours (one extra run)", "", *profile(argv_, env_, work)]
                    empty_bucket(client, bucket)
                if files_script and fc[0].ok_runs():
                    ours, sync = fc[0], fc[-1]
                    rss = ours.peak("tree_kib") / 1024
                    file_rss.append(rss)
                    r = ours.median("seconds") / sync.median("seconds") if sync.ok_runs() else None
                    targets += [f"| files {total_mib} MiB: peak tree RSS ≤ 200 MiB | {rss:.0f} MiB | {verdict(rss <= 200)} |",
                                f"| files {total_mib} MiB: wall ≤ 0.8 × sync+zip+pyAesCrypt | {r:.2f} × | {verdict(r <= 0.8) if r else 'n/a'} |"]
                save(final=False)
            if len(file_rss) >= 2:
                grow = file_rss[-1] / file_rss[0]
                targets.append(f"| files: peak RSS unchanged from {size.buckets[0][0]} to {size.buckets[-1][0]} MiB (≤ 1.1 ×) "
                               f"| {grow:.2f} × | {verdict(grow <= 1.1)} |")
        if "crypto" in parts:
            print("encryption throughput", file=sys.stderr)
            c = crypto_throughput(size)
            mb = 1e6
            out += ["### Encryption throughput of the files path (no S3)", "",
                    "| measure | MB/s | fraction of the limit |", "|---|---:|---:|",
                    f"| pyAesCrypt.encryptStream via FullReader, {AESCRYPT_BUFFER // 1024} KiB buffer, {size.crypto_mib} MiB "
                    f"in memory → null sink, per CPU second of its thread | {c['ours'] / mb:,.0f} | {c['ours'] / c['limit']:.2f} |",
                    f"| the same, per wall second (shared machine) | {c['ours_wall'] / mb:,.0f} | {c['ours_wall'] / c['limit']:.2f} |",
                    f"| `openssl speed -evp aes-256-cbc` (16 KiB blocks) | {c['aes'] / mb:,.0f} | |",
                    f"| `openssl speed sha256` (16 KiB blocks) | {c['sha'] / mb:,.0f} | |",
                    f"| limit: AES-CBC then HMAC-SHA256 on one core, 1/(1/aes + 1/sha) | {c['limit'] / mb:,.0f} | 1.00 |", ""]
        save(final=True)
    finally:
        sampler_stop.set()
        moto.stop()
        if pg:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {RESULTS.relative_to(REPO)} ({label}) in {(time.monotonic() - began) / 60:.1f} minutes", file=sys.stderr)
    return 0


def _clear(work: Path) -> None:
    for child in work.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
