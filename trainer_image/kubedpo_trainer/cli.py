"""`kubedpo-trainer --config FILE`: train in this process, or launch N local ranks first.

    kubedpo-trainer --config job.yaml                       # 1 process (CPU or 1 GPU)
    kubedpo-trainer --config job.yaml --nproc-per-node 8    # 8 local ranks (what a pod runs)
    torchrun --nproc-per-node 2 -m kubedpo_trainer.cli --config job.yaml   # also works

Exit codes are the operator's contract: see `kubedpo_trainer.errors`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .config import LOG_FORMAT_ENV, LOG_FORMATS, load_config, resolve_log_format
from .console import terminal
from .errors import EXIT_CONFIG, EXIT_RETRIABLE, KubeDPOError
from .launch import LaunchPlan, launch

log = logging.getLogger("kubedpo_trainer")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kubedpo-trainer", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="Trainer config (YAML or JSON), e.g. a DPOJob's spec.")
    p.add_argument("--check", action="store_true", help="Validate the config and exit (0 valid, 2 invalid).")
    p.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                   help=f"json: one JSON line per logging step (pods); rich: a live display; auto (default, "
                        f"or env {LOG_FORMAT_ENV}): rich when stdout is a terminal.")
    g = p.add_argument_group("launch (the pod's command; omit when started by torchrun/accelerate)")
    g.add_argument("--nproc-per-node", type=int, default=None, help="Local ranks to start.")
    g.add_argument("--nnodes", type=int, default=1)
    g.add_argument("--node-rank", type=int, default=int(os.environ.get("JOB_COMPLETION_INDEX", "0")))
    g.add_argument("--master-addr", default="127.0.0.1")
    g.add_argument("--master-port", type=int, default=29500)
    return p.parse_args(argv)


def setup_logging() -> None:
    """Plain lines on stderr; in rich mode rank 0 logs through the display's console, others warn only."""
    rank = os.environ.get("RANK", "0")
    level = os.environ.get("KUBEDPO_LOG_LEVEL", "INFO")
    if resolve_log_format() == "rich":
        if rank != "0":
            level = "WARNING"  # a second writer on the terminal would tear rank 0's live display
        else:
            from rich.logging import RichHandler

            logging.basicConfig(level=level, format="%(name)s: %(message)s", datefmt="[%X]",
                                handlers=[RichHandler(console=terminal(), show_path=False)])
            return
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Decided once, by the process that owns the terminal, and inherited by every rank it starts.
    try:
        os.environ[LOG_FORMAT_ENV] = resolve_log_format(args.log_format)
    except ValueError as err:
        print(f"kubedpo-trainer: {err}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging()
    try:
        cfg = load_config(args.config)
        if args.check:
            print(f"{args.config}: valid")
            return 0
        if args.nproc_per_node is not None and "LOCAL_RANK" not in os.environ:
            plan = LaunchPlan(args.nnodes, args.nproc_per_node, args.node_rank, args.master_addr,
                              args.master_port)
            return launch(plan, ["--config", args.config])
        from .signals import StopRequest

        stop = StopRequest(cfg.checkpoint.preemption_grace_seconds)
        stop.install()  # first: a SIGTERM while torch loads or the model downloads exits 75 too
        from . import preflight, storage

        storage.configure(cfg.s3)
        preflight.check(cfg)  # every URI, before any download or step: exit 2 naming the field
        if cfg.task == "generate":
            from .generate.task import run_generate

            run_generate(cfg, stop)
            return 0
        if cfg.task == "judge":
            from .judge.task import run_judge

            run_judge(cfg, stop)
            return 0
        from .train import Trainer  # torch is imported only when training (dpo and sft)

        if cfg.task == "sft":
            from .sft_train import SFTTrainer as Trainer
        trainer = Trainer(cfg, stop)  # if this raises, the error's traceback keeps it alive
        _KEEP_ALIVE.append(trainer)
        trainer.run()
        return 0
    except KubeDPOError as err:
        _KEEP_ALIVE.append(err)  # its traceback holds the trainer's frames: see _KEEP_ALIVE
        log.error("%s (exit %d)", err, err.exit_code)
        return err.exit_code
    except Exception as err:
        _KEEP_ALIVE.append(err)
        log.exception("trainer crashed (exit %d)", EXIT_RETRIABLE)
        return EXIT_RETRIABLE


# A rank that trained exits without tearing torch down. Freeing a DDP model joins gloo's
# worker thread while holding the GIL (a deadlock seen in CI-like runs), and interpreter
# teardown with a live process group can abort with "terminate called without an active
# exception" (SIGABRT) after a clean run. Either turns exit 0/2/75 into a hang or a crash the
# operator would retry. So the trainer and any error (whose traceback holds it) are kept
# alive, everything is flushed, and main() ends with os._exit: the kernel closes the sockets.
_KEEP_ALIVE: list[object] = []


def main(argv: Sequence[str] | None = None) -> None:
    code = run(argv)
    if _KEEP_ALIVE:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
