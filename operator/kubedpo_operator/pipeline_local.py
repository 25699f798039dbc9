"""`kubedpo pipeline run pipeline.yaml`: a DPOPipeline's stages one after the other on this machine.

Each stage is the DPOJob the operator would create (`pipeline_plan`), run by `kubedpo run`'s
code (`local.run_attempts`: the pods' commands, env and restart policy). A stage that finishes
leaves its result (what its task wrote to KUBEDPO_RESULT_FILE) at
`<output>/stages/<stage>.json`, beside a fingerprint of its spec; a re-run skips those stages
and resumes the first unfinished one, whose task skips its finished shards or resumes from
its newest checkpoint. A finished stage whose spec has since changed is refused rather than
silently reused: its outputs belong to the old spec.

The markers live under the pipeline's output (local or s3://), so this module reads and
writes them with the trainer's storage helpers: the local runner only runs where the trainer
is installed (it starts kubedpo-trainer processes).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import yaml

from kubedpo_trainer import storage
from kubedpo_trainer.config import resolve_log_format
from kubedpo_trainer.errors import EXIT_CONFIG, EXIT_OK
from kubedpo_trainer.stage_config import RESULT_FILE_ENV

from .api import SpecError
from .local import first_document, run_attempts
from .pipeline_api import PIPELINE_KIND, DPOPipelineSpec, RoundResult
from .pipeline_plan import PlannedStage, parse_pipeline, root, round_results

STAGES = "stages/"
COIN_FLIP = 0.5  # a judge with no preference between two policies: ties count half


def load_pipeline_manifest(path: str) -> tuple[str, str, DPOPipelineSpec, list[PlannedStage]]:
    """(name, namespace, spec, stages) of the first DPOPipeline in `path`; SpecError names the field."""
    name, namespace, raw = first_document(path, PIPELINE_KIND)
    spec, stages = parse_pipeline(name, raw)
    return name, namespace, spec, stages


def marker_uri(spec: DPOPipelineSpec, stage: PlannedStage) -> str:
    return f"{root(spec)}{STAGES}{stage.name}.json"


def fingerprint(stage: PlannedStage) -> str:
    """What the stage computes: its trainer config (cluster fields and metrics port do not change it)."""
    wire = stage.spec.trainer_config().to_wire()
    wire.pop("metrics", None)
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:16]


def read_marker(spec: DPOPipelineSpec, stage: PlannedStage) -> dict[str, Any] | None:
    uri = marker_uri(spec, stage)
    if not storage.exists(uri):
        return None
    try:
        value = json.loads(storage.read_bytes(uri))
    except ValueError:
        return None  # a torn marker: the stage runs again and its tasks skip what they finished
    return value if isinstance(value, dict) else None


def write_marker(spec: DPOPipelineSpec, stage: PlannedStage, result: dict[str, Any]) -> None:
    body = {"stage": stage.name, "job": stage.job_name, "task": stage.task, "fingerprint": fingerprint(stage),
            "finishedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "result": result}
    storage.write_bytes(marker_uri(spec, stage), json.dumps(body, indent=1, sort_keys=True).encode())


class StageChanged(ValueError):
    """A finished stage's spec differs from what the manifest now plans."""


def finished_results(spec: DPOPipelineSpec, stages: list[PlannedStage]) -> dict[str, dict[str, Any]]:
    """Results of the stages already finished, in order; stops at the first unfinished one."""
    done: dict[str, dict[str, Any]] = {}
    for stage in stages:
        marker = read_marker(spec, stage)
        if marker is None:
            break
        if marker.get("fingerprint") != fingerprint(stage):
            raise StageChanged(
                f"stage {stage.name} finished with a different spec than the manifest now gives it; its "
                f"outputs belong to the old spec: use a new spec.output, or delete {marker_uri(spec, stage)} "
                "and the later stages' markers to redo it")
        result = marker.get("result")
        done[stage.name] = result if isinstance(result, dict) else {}
    return done


def run_stage(stage: PlannedStage, namespace: str, out: IO[str], log_format: str) -> tuple[int, dict[str, Any]]:
    """One stage's DPOJob to its end; (exit code, the result its task wrote)."""
    with tempfile.TemporaryDirectory(prefix=f"kubedpo-{stage.job_name}-") as workdir:
        config_path = Path(workdir) / "config.yaml"
        config_path.write_text(yaml.safe_dump(stage.spec.trainer_config().to_wire(), sort_keys=False))
        result_file = Path(workdir) / "result.json"
        code = run_attempts(stage.spec, stage.job_name, namespace, str(config_path), out, log_format,
                            extra_env={RESULT_FILE_ENV: str(result_file)})
        try:
            result = json.loads(result_file.read_text()) if code == EXIT_OK else {}
        except (OSError, ValueError):
            result = {}
    return code, result if isinstance(result, dict) else {}


def run(manifest: str, out: IO[str] = sys.stdout, log_format: str | None = None) -> int:
    """Every unfinished stage in order; exit 0 when all succeeded, else the failed stage's code."""
    try:
        name, namespace, spec, stages = load_pipeline_manifest(manifest)
        fmt = resolve_log_format(log_format, out)
    except (SpecError, ValueError, OSError, yaml.YAMLError) as err:
        print(f"{manifest}: {err}", file=sys.stderr)
        return EXIT_CONFIG
    storage.configure(spec.s3)
    try:
        results = finished_results(spec, stages)
    except StageChanged as err:
        print(f"{PIPELINE_KIND}/{name}: {err}", file=out)
        return EXIT_CONFIG
    say = _printer(name, out)
    if results:
        say(f"{len(results)} of {len(stages)} stages already finished ({', '.join(results)}): resuming")
    for i, stage in enumerate(stages, 1):
        if stage.name in results:
            continue
        say(f"stage {i}/{len(stages)}: {stage.name} (round {stage.round}, task {stage.task}, "
            f"DPOJob {stage.job_name}) -> {stage.output_uri}")
        code, result = run_stage(stage, namespace, out, fmt)
        if code != EXIT_OK:
            say(f"stage {stage.name} Failed (exit {code}); the pipeline stops here. Finished stages are kept "
                f"in {root(spec)}{STAGES}: run the same command again to resume from {stage.name}")
            _print_rounds(spec, results, out)
            return code
        write_marker(spec, stage, result)
        results[stage.name] = result
        say(f"stage {stage.name} Succeeded: {summarize(result)}")
    _print_rounds(spec, results, out)
    say(f"Succeeded; final policy {round_results(spec, results)[-1].model_uri}")
    return 0


def _printer(name: str, out: IO[str]) -> Any:
    def say(line: str) -> None:
        print(f"{PIPELINE_KIND}/{name}: {line}", file=out, flush=True)
    return say


def summarize(result: Mapping[str, Any]) -> str:
    """One line of a stage's result, in a stable order."""
    if not result:
        return "(the task reported no result)"
    return ", ".join(f"{k} {json.dumps(v, separators=(',', ':'))}" for k, v in sorted(result.items()))


def _fmt(v: float | int | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if pct else str(v)


def rounds_table(rows: list[RoundResult]) -> list[str]:
    """The per-round results as aligned text (what `kubectl get dpop -o yaml` shows as status.results)."""
    head = ["round", "prompts", "pairs", "ties", "unparseable", "inconsistent", "reward-acc",
            "win-vs-initial", "win-vs-previous"]
    body = [[str(r.round), _fmt(r.prompts), _fmt(r.pairs), _fmt(r.ties), _fmt(r.unparseable),
             _fmt(r.inconsistent), _fmt(r.reward_accuracy, True), _fmt(r.win_rate_vs_initial, True),
             _fmt(r.win_rate_vs_previous, True)] for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *body]]


def _print_rounds(spec: DPOPipelineSpec, results: Mapping[str, Mapping[str, Any]], out: IO[str]) -> None:
    rows = round_results(spec, results)
    if not rows:
        return
    print("\nper-round results (win rates: the judge's, on held-out prompts, ties count half; a judge "
          f"with no preference scores {COIN_FLIP:.3f}):", file=out)
    for line in rounds_table(rows):
        print(line, file=out)
    print(file=out, flush=True)
