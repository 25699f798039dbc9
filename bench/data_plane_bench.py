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
REPS = 15

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
from kubedpo_trainer.heap import freeze_long_lived
freeze_long_lived()  # as Trainer.setup does before it builds the stream
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


def _upload(server: SeaweedFS, bucket: str, prefix: str, rows: int, pad: int = 60,
            shard_rows: int = SHARD_ROWS) -> int:
    raw, total = server.client(), 0
    for s, start in enumerate(range(0, rows, shard_rows)):
        body = _rows_jsonl(start, min(shard_rows, rows - start), pad)
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


def _trainer_first_step(server: SeaweedFS, data: str, index: str, world: int, model: Path, out: Path) -> float:
    """Seconds from launching `kubedpo-trainer` (a pod's command) to rank 0's step-1 log line.

    What a user waits for: interpreter start, imports, model load, rendezvous, the stream's
    listing, index manifest and first batch, and the step itself; the data set's size enters
    only through the stream.
    """
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model": {"uri": str(model)},
           "data": {"train": data, "indexUri": index, "maxLength": 128, "shuffleBuffer": 1000, "blockRows": 256},
           "training": {"batchSize": 8, "maxSteps": 2, "loggingSteps": 1, "warmupRatio": 0.0},
           "output": {"uri": str(out / "output")}, "metrics": {"port": 0},
           "s3": {"endpointUrl": server.endpoint}}
    (out / "config.yaml").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "kubedpo_trainer.cli", "--config", str(out / "config.yaml")]
    if world > 1:
        cmd += ["--nproc-per-node", str(world)]
    env = {**os.environ, **server.env(), "OMP_NUM_THREADS": "1", "KUBEDPO_LOG_FORMAT": "json"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen, tail = None, []
    for line in proc.stderr:
        tail = (tail + [line])[-20:]
        if seen is None and '"event": "train"' in line and '"step": 1,' in line:
            seen = time.perf_counter() - t0
    if proc.wait() or seen is None:
        raise SystemExit(f"trainer failed ({data}, world {world}):\n" + "".join(tail))
    return seen


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[1000, 100_000, 2_000_000])
    ap.add_argument("--epoch-rows", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=REPS, help="fresh processes per size for the first-step medians")
    ap.add_argument("--shard-rows", type=int, default=SHARD_ROWS,
                    help="rows per JSONL shard (1000: every set is made of the same small objects)")
    ap.add_argument("--trainer-reps", type=int, default=5,
                    help="real kubedpo-trainer launches per size and world for the end-to-end first step")
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
        built = {}
        for rows in args.sizes:
            size = _upload(server, bucket, f"d{rows}", rows, shard_rows=args.shard_rows)
            data = uri(f"d{rows}/")
            one = _ranks("index", server, data, uri(f"idx1-{rows}/"), 1, tok)
            two = _ranks("index", server, data, uri(f"idx2-{rows}/"), 2, tok)
            built[rows] = (size, data, one, two, _raw_get_mib_s(server, bucket, f"d{rows}"))
        # Sub-second timings are noisy: `reps` fresh starts per size, the sizes interleaved (so a
        # burst of load hits every size alike, not one), and the median reported.
        f1: dict[int, list[dict]] = {rows: [] for rows in args.sizes}
        f2: dict[int, list[list[dict]]] = {rows: [] for rows in args.sizes}
        for _ in range(args.reps):
            for rows in args.sizes:
                data = built[rows][1]
                f1[rows].append(_ranks("first", server, data, uri(f"idx1-{rows}/"), 1, tok)[0])
                f2[rows].append(_ranks("first", server, data, uri(f"idx1-{rows}/"), 2, tok))
        medians1, medians2 = {}, {}
        for rows in args.sizes:
            size, data, one, two, raw = built[rows]
            medians1[rows] = first1 = statistics.median(r["first_step_s"] for r in f1[rows])
            medians2[rows] = first2 = statistics.median(max(r["first_step_s"] for r in rs) for rs in f2[rows])
            cpu1 = statistics.median(r["first_step_cpu_s"] for r in f1[rows])
            mib = size / MiB
            split = "/".join(f"{r['indexed_bytes'] / MiB:.0f}" for r in two)
            print(f"| {rows:,} | {mib:.1f} | {one[0]['index_s']:.2f} | {mib / one[0]['index_s']:.0f} | "
                  f"{max(r['index_s'] for r in two):.2f} ({split} MiB) | {raw:.0f} | {first1:.3f} ({cpu1:.3f}) | "
                  f"{first2:.3f} | {f1[rows][0]['rss_mib']:.0f} ({f1[rows][0]['base_rss_mib']:.0f}) | "
                  f"{max(r['rss_mib'] for rs in f2[rows] for r in rs):.0f} | {f1[rows][0]['gets']} |", flush=True)
        for world, med in ((1, medians1), (2, medians2)):
            print(f"\n{world} rank(s): slowest size / fastest size = {max(med.values()) / min(med.values()):.2f} "
                  f"(within 20 % means <= 1.20)", flush=True)

        if args.trainer_reps:
            from transformers import AutoTokenizer

            from kubedpo_trainer.tiny import build_model

            model = Path(tmp) / "model"
            build_tokenizer(model)
            build_model(model, AutoTokenizer.from_pretrained(str(model)))
            print("\n### Time to first step of the real trainer (launch to rank 0's step-1 log line), index built\n")
            print(f"Median of {args.trainer_reps} launches per cell, sizes interleaved; tiny local model, data on SeaweedFS\n")
            print("| rows | 1 rank s (min-max) | 2 ranks s (min-max) |")
            print("|---|---|---|")
            runs: dict[tuple[int, int], list[float]] = {(r, w): [] for r in args.sizes for w in (1, 2)}
            for rep in range(args.trainer_reps):
                for rows in args.sizes:
                    for world in (1, 2):
                        runs[rows, world].append(_trainer_first_step(
                            server, built[rows][1], uri(f"idx1-{rows}/"), world, model,
                            Path(tmp) / f"run-{rows}-{world}-{rep}"))
            med = {k: statistics.median(v) for k, v in runs.items()}
            for rows in args.sizes:
                cells = [f"{med[rows, w]:.2f} ({min(runs[rows, w]):.2f}-{max(runs[rows, w]):.2f})" for w in (1, 2)]
                print(f"| {rows:,} | {cells[0]} | {cells[1]} |", flush=True)
            for world in (1, 2):
                values = [med[rows, world] for rows in args.sizes]
                print(f"\n{world} rank(s), real trainer: slowest size / fastest size = "
                      f"{max(values) / min(values):.2f} (within 20 % means <= 1.20)", flush=True)

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
