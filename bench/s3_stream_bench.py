"""S3 streaming benchmark against a local SeaweedFS: throughput, time to first row, peak RSS.

    .venv/bin/python bench/s3_stream_bench.py [--mib 32] [--objects 4] [--rows 2000]

1. Throughput of `storage.open_range` (resumable ranged reader, 1 MiB buffered reads) vs a
   raw boto3 `get_object()["Body"].read()` of the same objects; the ratio should be ~1.
2. A small JSONL.gz dataset and a 50x larger one are generated into SeaweedFS; a fresh
   process lists the shards, streams every row through `gzip.open(open_range(...))`, and
   reports the time to the first row and its peak RSS. Both should be flat (streaming,
   never a whole-dataset download); only the full pass grows with size.
Prints a markdown table. Not a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubedpo_trainer import storage  # noqa: E402
from kubedpo_trainer.config import S3Config  # noqa: E402
from tests.support.seaweed import SeaweedFS  # noqa: E402

MiB = 1024 * 1024

# Runs in a fresh interpreter so peak RSS is this pass's alone.
_STREAM = """
import gzip, json, sys, time
t0 = time.perf_counter()
from kubedpo_trainer import storage
shards = storage.list_objects(sys.argv[1], suffixes=(".jsonl.gz",))
first, rows = None, 0
for s in shards:
    with gzip.open(storage.open_range(s.uri)) as f:
        for line in f:
            json.loads(line)
            rows += 1
            if first is None:
                first = time.perf_counter() - t0
total = time.perf_counter() - t0
# VmHWM, not ru_maxrss: ru_maxrss keeps the parent's peak across fork+exec.
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({"first": first, "total": total, "rows": rows, "shards": len(shards), "rss_mib": hwm / 1024}))
"""


def throughput(server: SeaweedFS, bucket: str, n: int, mib: int) -> tuple[float, float]:
    """Best-of-2 MiB/s for open_range and for raw get_object over the same `n` objects."""
    raw = server.client()
    keys = [f"tp/obj-{i}.bin" for i in range(n)]
    for k in keys:
        raw.put_object(Bucket=bucket, Key=k, Body=os.urandom(mib * MiB))

    def ours() -> None:
        for k in keys:
            with storage.open_range(f"s3://{bucket}/{k}") as f:
                while f.read(MiB):
                    pass

    def boto() -> None:
        for k in keys:
            raw.get_object(Bucket=bucket, Key=k)["Body"].read()

    rates = {}
    for name, fn in (("ours", ours), ("boto", boto)):
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        rates[name] = n * mib / best
    return rates["ours"], rates["boto"]


def make_dataset(server: SeaweedFS, bucket: str, prefix: str, shards: int, rows: int) -> int:
    raw, size = server.client(), 0
    for s in range(shards):
        lines = (json.dumps({"prompt": f"question {s}-{i} " * 8, "chosen": f"good answer {i} " * 6,
                             "rejected": f"bad answer {i} " * 6}) for i in range(rows))
        blob = gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=1)
        raw.put_object(Bucket=bucket, Key=f"{prefix}/shard-{s:04d}.jsonl.gz", Body=blob)
        size += len(blob)
    return size


def stream_pass(server: SeaweedFS, uri: str) -> dict[str, float]:
    env = {**os.environ, **server.env(), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _STREAM, uri], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=32, help="size of each throughput object, MiB")
    ap.add_argument("--objects", type=int, default=4, help="objects in the throughput test")
    ap.add_argument("--rows", type=int, default=2000, help="rows per shard of the small dataset")
    ap.add_argument("--shards", type=int, default=4, help="shards in each dataset")
    args = ap.parse_args()

    with SeaweedFS() as server:
        os.environ.update(server.env())
        storage.configure(S3Config(endpoint_url=server.endpoint))
        bucket = server.new_bucket("bench")
        ours, boto = throughput(server, bucket, args.objects, args.mib)
        print(f"\n| read path | MiB/s ({args.objects} x {args.mib} MiB) |\n|---|---|")
        print(f"| raw boto3 get_object().read() | {boto:.0f} |")
        print(f"| storage.open_range (buffered, resumable) | {ours:.0f} |")
        print(f"| ratio open_range / raw | {ours / boto:.2f} |")

        print("\n| dataset | rows | gz MiB | time to first row (s) | full pass (s) | peak RSS (MiB) |")
        print("|---|---|---|---|---|---|")
        for name, scale in (("small", 1), ("50x", 50)):
            size = make_dataset(server, bucket, name, args.shards, args.rows * scale)
            r = stream_pass(server, f"s3://{bucket}/{name}/")
            print(f"| {name} | {r['rows']} | {size / MiB:.1f} | {r['first']:.3f} | {r['total']:.1f} "
                  f"| {r['rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
