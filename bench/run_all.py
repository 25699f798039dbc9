"""Run every benchmark (`make bench`) one after another and print their tables for BENCHMARKS.md.

    .venv/bin/python bench/run_all.py [--only trl_compare checkpoint_stall]

Sequential on purpose: on a 2-core box two benchmarks at once would measure each other.
Each script runs in its own interpreter, offline (HF_HUB_OFFLINE=1), with the repo on PYTHONPATH.
Exit status is 1 if any benchmark failed; the others still run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["trl_compare", "checkpoint_stall", "s3_stream_bench", "data_plane_bench", "operator_scale"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=BENCHES, default=BENCHES)
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    failed = []
    for name in args.only:
        print(f"\n## {name}\n", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / f"{name}.py")], env=env, capture_output=True,
                              text=True)
        print(proc.stdout.rstrip(), flush=True)
        if proc.returncode:
            failed.append(name)
            print(f"\n{name} FAILED (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
