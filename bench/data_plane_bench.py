"""Data plane at scale against a local SeaweedFS: index cost, time to first step, RSS, bytes per rank.

    .venv/bin/python bench/data_plane_bench.py [--sizes 1000 100000 2000000] [--epoch-rows 10000]

1. Index build, once per data set (a fresh process, 1 rank and 2 ranks sharing the work),
   with its throughput next to a raw boto3 GET of the same bytes.
2. Time to first step (stream construction: listing, index manifest, first global batch read
   and tokenized) and peak RSS of each rank's process, for 1 and 2 ranks, once the index
   exists. Should be flat across sizes (within 20%): nothing scales with the data set.
3. One epoch of a `--epoch-rows` set on 2 and 4 ranks: bytes each rank fetched (data and
   index, counted by the S3 reader) over dataset / world, GET requests per step, and the
   time per request (the per-request overhead of many small ranged reads).
Prints markdown tables. Not a timed test: numbers depend on the machine. The 2M-row set
(~330 MB) lives here only, never in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kubedpo_trainer import storage  # noqa: E402
from kubedpo_trainer.config import S3Config  # noqa: E402
from tests.support.seaweed import SeaweedFS  # noqa: E402

MiB = 1024 * 1024
SHARD_ROWS = 100_000
REPS = 5

# One rank in a fresh interpreter: argv = mode, data uri, index uri, rank, world, barrier dir, tokenizer dir.
_RANK = r"""
import json, os, sys, time
t0 = time.perf_counter()
from pathlib import Path
from transformers import AutoTokenizer
from kubedpo_trainer import storage
from kubedpo_trainer.config import DataConfig, S3Config
from kubedpo_trainer.data.stream import PreferenceStream
mode, data, index, rank, world, bdir, tok_dir = sys.argv[1:8]
rank, world = int(rank), int(world)
storage.configure(S3Config(endpoint_url=os.environ["AWS_ENDPOINT_URL"]))
tok = AutoTokenizer.from_pretrained(tok_dir)
n = [0]
def barrier():
    n[0] += 1
    Path(bdir, f"{n[0]}-{rank}").touch()
    while len(list(Path(bdir).glob(f"{n[0]}-*"))) < world:
        time.sleep(0.01)
cfg = DataConfig(train=data, index_uri=index, max_length=128, shuffle_buffer=1000, block_rows=256)
imported = time.perf_counter() - t0
base_rss = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmRSS:")) / 1024
t1, c1 = time.perf_counter(), time.process_time()
s = PreferenceStream(cfg, data, tok, rank, world, batch_size=8, barrier=barrier)
out = {"rank": rank, "import_s": imported, "base_rss_mib": base_rss}
if mode == "index":
    out["rows"] = s.rows_per_epoch()
    out["index_s"] = time.perf_counter() - t1
    out["indexed_bytes"] = s.index.indexed_bytes
elif mode == "first":
    groups = s.batches(until_step=1, accumulation=1)
    next(groups)
    out["first_step_s"] = time.perf_counter() - t1
    out["first_step_cpu_s"] = time.process_time() - c1
    out["gets"], out["bytes"] = storage.traffic()
    groups.close()
else:  # epoch: fetch (not tokenize) every row of this rank's slices
    s.rows_per_epoch()
    g0, b0 = storage.traffic()
    t2 = time.perf_counter()
    steps = s.steps_per_epoch()
    for step in range(steps):
        s.rows_for_step(0, step)
    g1, b1 = storage.traffic()
    out.update(steps=steps, gets=g1 - g0, bytes=b1 - b0, fetch_s=time.perf_counter() - t2)
out["rss_mib"] = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) / 1024
print(json.dumps(out))
"""


def _rows_jsonl(start: int, n: int, pad: int = 60) -> bytes:
    return "".join(json.dumps({"prompt": f"Words: cat dog fish {i}.", "chosen": " animal", "rejected": " color",
                               "id": i, "note": "x" * pad}) + "\n" for i in range(start, start + n)).encode()


def _upload(server: SeaweedFS, bucket: str, prefix: str, rows: int, pad: int = 60) -> int:
    raw, total = server.client(), 0
    for s, start in enumerate(range(0, rows, SHARD_ROWS)):
        body = _rows_jsonl(start, min(SHARD_ROWS, rows - start), pad)
        raw.put_object(Bucket=bucket, Key=f"{prefix}/part-{s:05d}.jsonl", Body=body)
        total += len(body)
    return total


def _raw_get_mib_s(server: SeaweedFS, bucket: str, prefix: str) -> float:
    raw = server.client()
    keys = [o["Key"] for o in raw.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    t0, n = time.perf_counter(), 0
    for k in keys:
        n += len(raw.get_object(Bucket=bucket, Key=k)["Body"].read())
    return n / MiB / (time.perf_counter() - t0)


def _ranks(mode: str, server: SeaweedFS, data: str, index: str, world: int, tok: Path) -> list[dict]:
    bdir = tempfile.mkdtemp(prefix="kubedpo-barrier-")
    env = {**os.environ, **server.env(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, mode, data, index, str(r), str(world), bdir, str(tok)],
                              env=env, stdout=subprocess.PIPE, text=True) for r in range(world)]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=3600)
        if p.returncode:
            raise SystemExit(f"rank failed ({mode}, {data}, world {world})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[1000, 100_000, 2_000_000])
    ap.add_argument("--epoch-rows", type=int, default=10_000)
    ap.add_argument("--skip-epoch", action="store_true", help="only the index and first-step table")
    args = ap.parse_args()
    from kubedpo_trainer.tiny import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp, SeaweedFS() as server:
        os.environ.update(server.env())
        tok = Path(tmp) / "tok"
        build_tokenizer(tok)
        bucket = server.new_bucket("bench")
        storage.configure(S3Config(endpoint_url=server.endpoint))
        uri = lambda k: f"s3://{bucket}/{k}"  # noqa: E731
        print("### Index build (once per data set version) and time to first step after it\n")
        print("| rows | MiB | index 1 rank s | index MiB/s | index 2 ranks s (MiB read by each) | raw GET MiB/s "
              "| first step 1 rank s, median (CPU s) | first step 2 ranks s (median of max) | RSS 1 rank MiB (imports alone) | RSS 2 ranks MiB (max) "
              "| GETs to first step |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for rows in args.sizes:
            size = _upload(server, bucket, f"d{rows}", rows)
            data = uri(f"d{rows}/")
            one = _ranks("index", server, data, uri(f"idx1-{rows}/"), 1, tok)
            two = _ranks("index", server, data, uri(f"idx2-{rows}/"), 2, tok)
            raw = _raw_get_mib_s(server, bucket, f"d{rows}")
            # Sub-second timings on a shared 2-core box are noisy: the median of REPS fresh starts.
            f1 = [_ranks("first", server, data, uri(f"idx1-{rows}/"), 1, tok)[0] for _ in range(REPS)]
            f2 = [_ranks("first", server, data, uri(f"idx1-{rows}/"), 2, tok) for _ in range(REPS)]
            first1 = statistics.median(r["first_step_s"] for r in f1)
            first2 = statistics.median(max(r["first_step_s"] for r in rs) for rs in f2)
            cpu1 = statistics.median(r["first_step_cpu_s"] for r in f1)
            mib = size / MiB
            split = "/".join(f"{r['indexed_bytes'] / MiB:.0f}" for r in two)
            print(f"| {rows:,} | {mib:.1f} | {one[0]['index_s']:.2f} | {mib / one[0]['index_s']:.0f} | "
                  f"{max(r['index_s'] for r in two):.2f} ({split} MiB) | {raw:.0f} | {first1:.2f} ({cpu1:.2f}) | {first2:.2f} | "
                  f"{f1[0]['rss_mib']:.0f} ({f1[0]['base_rss_mib']:.0f}) | "
                  f"{max(r['rss_mib'] for rs in f2 for r in rs):.0f} | {f1[0]['gets']} |", flush=True)

        if args.skip_epoch:
            return 0
        print("\n### One epoch: bytes fetched per rank (data + index) vs dataset / world; requests per step\n")
        print(f"{args.epoch_rows:,} rows, batch 8 per rank, window 1000, blocks of 256; the index adds 8 bytes a "
              "row of the whole data set to every rank (offsets are fetched by block)\n")
        print("| row bytes | world | rank | bytes fetched | / (dataset / world) | GETs | steps | GETs per step "
              "| ms per GET |")
        print("|---|---|---|---|---|---|---|---|---|")
        for pad in (60, 900):
            size = _upload(server, bucket, f"epoch{pad}", args.epoch_rows, pad)
            data = uri(f"epoch{pad}/")
            _ranks("index", server, data, uri(f"idx-epoch{pad}/"), 1, tok)
            for world in (2, 4):
                for r in _ranks("epoch", server, data, uri(f"idx-epoch{pad}/"), world, tok):
                    print(f"| {size // args.epoch_rows} | {world} | {r['rank']} | {r['bytes']:,} | "
                          f"{r['bytes'] / (size / world):.3f} | {r['gets']:,} | {r['steps']} | "
                          f"{r['gets'] / r['steps']:.1f} | {1000 * r['fetch_s'] / r['gets']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
