"""Run every benchmark (`make bench`) and print their tables; numbers go into BENCHMARKS.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["trl_compare.py", "checkpoint_stall.py", "s3_stream_bench.py"]


def main() -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    failed = 0
    for name in BENCHES:
        print(f"\n## {name}\n", flush=True)
        failed += subprocess.call([sys.executable, str(HERE / name)], env=env) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
