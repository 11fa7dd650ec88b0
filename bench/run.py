"""`make bench`: our backups and restore against the approaches they replace, on this machine.

Sets up real PostgreSQL databases (pgbench plus a jsonb/bytea table, and an application-like
generated one for compression) and source buckets on a local S3 endpoint (moto's server, run as a
separate process so its memory and CPU are not counted), runs every contender several times,
alternating, and writes bench/RESULTS.md. See bench/README.md for what each column means.
Each part lives in its own module: database.py, files.py, crypto.py; datasets.py builds the data.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dev.harness import REPO, PostgresCluster

from . import database, datasets, files
from .common import MIB, RESULTS, Contender, MotoProcess, alternate, cell, clear, empty_bucket, machine, profile, table, verdict, write_section
from .crypto import crypto_throughput


@dataclass
class Size:
    name: str
    pgbench_scale: int
    blob_mib: int
    realistic_mib: int  # plain dump of the application-like database, about
    buckets: list[tuple[int, int]]  # (total MiB, object count) per source bucket
    reps: int
    crypto_mib: int


SIZES = {
    # ≈ 300 MB pgbench dump, ≈ 150 MB application-like dump, 128/256 MiB buckets: a few minutes.
    "quick": Size("quick", 20, 50, 128, [(128, 256), (256, 512)], 2, 128),
    # ≈ 1 GB pgbench dump (pgbench 70 ≈ 0.66 GB + 170 MiB of bytea ≈ 0.36 GB of hex), ≈ 600 MB
    # application-like dump (the compression targets ask for ≥ 500 MB), 1 and 2 GiB buckets.
    "full": Size("full", 70, 170, 520, [(1024, 2048), (2048, 4096)], 3, 512),
}
PARTS = ("db", "real", "levels", "restore", "files", "files-restore", "crypto")
LEVELS = [1, 2, 3, 4, 6]


def ratio(a: Contender, b: Contender, attr: str = "seconds") -> float | None:
    mine, theirs = a.median(attr), b.median(attr)
    return mine / theirs if mine and theirs else None


def target(text: str, value: float | None, ok: bool | None, unit: str = " ×") -> str:
    return f"| {text} | {'-' if value is None else f'{value:.2f}{unit}'} | {verdict(None if value is None else ok)} |"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 2 repetitions (a few minutes)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--reps", type=int, help="repetitions (default: 2 quick, 3 full)")
    p.add_argument("--scale", type=int, help="pgbench scale (default: 20 quick, 70 full)")
    p.add_argument("--blob-mib", type=int, help="MiB of bytea in bench_blobs (default: 50 quick, 170 full)")
    p.add_argument("--realistic-mib", type=int, help="about how large the application-like dump is (default: 128 quick, 520 full)")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="zstd levels the levels part compares")
    p.add_argument("--buckets", help="source buckets as MIB:COUNT,... (default: 128:256,256:512 quick, 1024:2048,2048:4096 full)")
    p.add_argument("--files-script", type=Path, help="backup_files.py to run as 'ours' (default: scripts/backup_files.py)")
    p.add_argument("--profile", action="store_true", help="also run ours once under py-spy and tabulate its profile")
    p.add_argument("--compare-scripts", type=Path, help="a checkout whose scripts/ also run as a contender, e.g. before a change")
    p.add_argument("--note", default="", help="a line for RESULTS.md, e.g. what else was running")
    p.add_argument("--label", help="section of RESULTS.md to write (default: quick or full)")
    args = p.parse_args(argv)

    size = SIZES["quick" if args.quick else "full"]
    size.reps = args.reps or size.reps
    size.pgbench_scale = args.scale or size.pgbench_scale
    size.blob_mib = args.blob_mib if args.blob_mib is not None else size.blob_mib
    size.realistic_mib = args.realistic_mib or size.realistic_mib
    if args.buckets:
        size.buckets = [tuple(int(x) for x in b.split(":")) for b in args.buckets.split(",")]
    parts = set(args.parts.split(","))
    files_script = (args.files_script or REPO / "scripts" / "backup_files.py").resolve()
    compare = args.compare_scripts.resolve() if args.compare_scripts else None

    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/var/tmp"))  # a disk, not tmpfs: its writes must count
    pg = PostgresCluster().start() if parts & {"db", "real", "levels", "restore"} else None
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

    def empty() -> None:
        empty_bucket(client, bucket)
        clear(work)

    try:
        if "db" in parts:
            print(f"database (pgbench): pgbench -s {size.pgbench_scale} + {size.blob_mib} MiB of bytea", file=sys.stderr)
            datasets.pgbench(pg, "benchsrc", size.pgbench_scale, size.blob_mib)
            dump_bytes = database.dump_size(pg, "benchsrc")
            contenders = database.backup_contenders(pg, moto, bucket, work, "benchsrc", compare=compare)
            alternate(contenders, size.reps, cleanup=empty)
            out += [f"### Database backup, pgbench dataset: plain dump {dump_bytes / MIB:,.0f} MiB", "",
                    "pgbench's filler compresses about 50-fold: the compression figures are in the application-like part.", "",
                    *table(contenders), ""]
            ours, three = contenders[0], next(c for c in contenders if c.name.startswith("three-step"))
            r = ratio(ours, three)
            targets.append(target("pgbench: ours ÷ three-step wall (was ≤ 0.7)", r, (r or 9) <= 0.7))
            pg.drop_database("benchsrc")
            save(final=False)

        if parts & {"real", "levels", "restore"}:
            print(f"database (application-like): about {size.realistic_mib} MiB of plain dump", file=sys.stderr)
            datasets.realistic(pg, "realsrc", size.realistic_mib)
            real_bytes = database.dump_size(pg, "realsrc")
            out.append(f"Application-like database (bench/datasets.py, fixed seed): plain dump {real_bytes / MIB:,.0f} MiB. "
                       f"{size.reps} repetitions, contenders alternating.\n")

        if "real" in parts:
            print("database backup (application-like):", file=sys.stderr)
            contenders = database.backup_contenders(pg, moto, bucket, work, "realsrc", three_step=False, compare=compare)
            alternate(contenders, size.reps, cleanup=empty, stored=database.stored_bytes(moto, bucket))
            ours, none = contenders[0], contenders[1]
            pipe_zstd = next(c for c in contenders if c.name.startswith("pipe + zstd"))
            pipe = next(c for c in contenders if c.name.startswith("pipe:"))
            floor = contenders[-1]
            compressed = ours.median("stored")
            out += ["### Database backup, application-like dataset", "", *table(contenders), "",
                    "| contender | stored (MiB) | SQL ÷ stored |", "|---|---:|---:|",
                    *[f"| {cell(c.name)} | {c.median('stored') / MIB:,.1f} | {real_bytes / c.median('stored'):.2f} |"
                      for c in contenders if c.prefix and c.median("stored")], ""]
            rss = ours.peak("tree_kib") / 1024 if ours.ok_runs() else None
            vs_pipe_zstd, vs_pipe = ratio(ours, pipe_zstd), ratio(ours, pipe)
            targets += [
                target("database (application-like): ours ≤ 1.05 × the compressed pipe", vs_pipe_zstd, (vs_pipe_zstd or 9) <= 1.05),
                target("database (application-like): ours ≤ 0.75 × the uncompressed pipe", vs_pipe, (vs_pipe or 9) <= 0.75),
                target("database (application-like): ours ÷ the floor (pg_dump > /dev/null), reported", ratio(ours, floor), True),
                target("database (application-like): compression ratio (SQL ÷ stored), reported",
                       real_bytes / compressed if compressed else None, True),
                target("database (application-like): peak tree RSS ≤ 100 MiB", rss, (rss or 999) <= 100, " MiB"),
                target("database (application-like): --compression none ÷ the uncompressed pipe, reported", ratio(none, pipe), True),
            ]
            if compare:
                # The other checkout runs with its own defaults: before compression existed that
                # is the original format, to hold --compression none to; later, zstd, reported.
                before = next(c for c in contenders if c.name.startswith("ours at"))
                if before.median("stored") > real_bytes * 0.9:
                    r = ratio(none, before)
                    targets.append(target("--compression none within 5 % of the code before compression (same run)",
                                          r, abs((r or 9) - 1) <= 0.05))
                else:
                    targets.append(target(f"ours ÷ the same script at {compare} (both zstd), reported", ratio(ours, before), True))
            save(final=False)

        if "levels" in parts:
            levels = [int(x) for x in args.levels.split(",")]
            print(f"zstd levels {levels} (application-like):", file=sys.stderr)
            contenders = database.level_contenders(pg, moto, bucket, "realsrc", levels)
            alternate(contenders, size.reps, cleanup=empty, stored=database.stored_bytes(moto, bucket))
            rows = ["| zstd level | median wall (s) | median CPU, tree (s) | stored (MiB) | ratio |", "|---:|---:|---:|---:|---:|"]
            for level, c in zip(levels, contenders):
                wall, cpu, kept = c.median("seconds"), c.median("cpu"), c.median("stored")
                rows.append(f"| {level} | {wall or 0:.1f} | {cpu or 0:.1f} | {(kept or 0) / MIB:,.1f} | "
                            f"{real_bytes / kept if kept else 0:.2f} |")
            best = min(zip(levels, contenders), key=lambda lc: lc[1].median("seconds") or 1e9)
            out += ["### zstd levels, application-like dataset (the default is the fastest backup)", "", *rows, "",
                    f"Fastest: level {best[0]}.", ""]
            save(final=False)

        if "restore" in parts:
            print("restore (application-like):", file=sys.stderr)
            contenders = database.restore_contenders(pg, moto, bucket, work, "realsrc", compare)
            alternate(contenders, size.reps)
            empty_bucket(client, bucket)
            database.drop_restore_targets(pg, size.reps)
            out += ["### Restore, application-like dataset (same dump, fresh database each run)", "", *table(contenders), ""]
            if args.profile:
                argv_, env_, _ = contenders[0].command(size.reps)
                out += ["#### Profile of ours (one extra run)", "", *profile(argv_, env_, work)]
                database.drop_restore_targets(pg, size.reps)
            r = ratio(contenders[0], contenders[-1])
            targets.append(target("restore (application-like, zstd): ours ≤ 1.1 × psql -f of the plain dump", r, (r or 9) <= 1.1))
            streamed = next(c for c in contenders if c.name == database.BUCKET_RESTORE)
            r = ratio(streamed, contenders[-1])
            targets.append(target("restore from the bucket (application-like, zstd): ours ≤ 1.3 × psql -f of the plain dump",
                                  r, (r or 9) <= 1.3))
            clear(work)
            save(final=False)

        if "files" in parts:
            file_rss: list[float] = []
            for total_mib, count in size.buckets:
                source = f"source-{total_mib}m-{uuid.uuid4().hex[:6]}"
                print(f"files backup: filling s3://{source} with {count} objects, {total_mib} MiB", file=sys.stderr)
                files.fill_bucket(client, source, total_mib, count)
                contenders = files.files_contenders(moto, source, bucket, work, files_script)
                alternate(contenders, size.reps, cleanup=empty)
                out += [f"### Files backup: {total_mib} MiB in {count} objects", "", *table(contenders), ""]
                if "files-restore" in parts:
                    restorers = files.restore_contenders(moto, source, bucket, work)
                    alternate(restorers, size.reps)
                    for name in [b["Name"] for b in client.list_buckets()["Buckets"] if b["Name"].startswith("restored-")]:
                        empty_bucket(client, name)
                        client.delete_bucket(Bucket=name)
                    empty()
                    out += [f"### Files restore: {total_mib} MiB in {count} objects, into an empty bucket", "", *table(restorers), ""]
                    manual = next(c for c in restorers if c.name == files.MANUAL_RESTORE)
                    r = ratio(restorers[0], manual)
                    targets.append(target(f"files restore {total_mib} MiB: wall ≤ 0.7 × the manual path", r, (r or 9) <= 0.7))
                empty_bucket(client, source)
                client.delete_bucket(Bucket=source)
                if args.profile:
                    argv_, env_, _ = contenders[0].command(0)
                    out += ["#### Profile of ours (one extra run)", "", *profile(argv_, env_, work)]
                    empty_bucket(client, bucket)
                if contenders[0].ok_runs():
                    rss = contenders[0].peak("tree_kib") / 1024
                    file_rss.append(rss)
                    r = ratio(contenders[0], contenders[-1])
                    targets += [target(f"files {total_mib} MiB: peak tree RSS ≤ 200 MiB", rss, rss <= 200, " MiB"),
                                target(f"files {total_mib} MiB: wall ≤ 0.8 × sync+zip+pyAesCrypt", r, (r or 9) <= 0.8)]
                save(final=False)
            if len(file_rss) >= 2:
                grow = file_rss[-1] / file_rss[0]
                targets.append(target(f"files: peak RSS unchanged from {size.buckets[0][0]} to {size.buckets[-1][0]} MiB (≤ 1.1 ×)",
                                      grow, grow <= 1.1))

        if "crypto" in parts:
            print("encryption throughput", file=sys.stderr)
            c = crypto_throughput(size.crypto_mib)
            mb = 1e6
            out += ["### Encryption throughput of the files path (no S3)", "",
                    "| measure | MB/s | fraction of the limit |", "|---|---:|---:|",
                    f"| pyAesCrypt.encryptStream via FullReader, {size.crypto_mib} MiB in memory → null sink, per CPU second of its "
                    f"thread | {c['ours'] / mb:,.0f} | {c['ours'] / c['limit']:.2f} |",
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
