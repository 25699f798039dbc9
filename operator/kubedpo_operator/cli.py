"""`kubedpo`: the operator, the CRD generator and offline manifest checks.

    kubedpo crd > crds/kubedpo.io_dpojobs.yaml   # the CRD, generated from api.py
    kubedpo crd --kind DPOPipeline                # the DPOPipeline CRD, from pipeline_api.py
    kubedpo validate examples/tiny-cpu.yaml       # the CRD schema, the operator's checks and its children's
    kubedpo plan examples/multinode-full.yaml     # per-GPU memory estimate; what to change if it won't fit
    kubedpo operator                              # run the kopf operator (in-cluster or kubeconfig)
    kubedpo pipeline run examples/iterative-pipeline.yaml   # a DPOPipeline's stages on this machine
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from .api import KIND, SpecError, parse_spec
from .pipeline_api import PIPELINE_KIND


def cmd_crd(args: argparse.Namespace) -> int:
    if args.kind == "DPOPipeline":
        from .pipeline_crd import render_pipeline_crd

        sys.stdout.write(render_pipeline_crd())
        return 0
    from .crd import render_crd

    sys.stdout.write(render_crd())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """The operator's own admission and child checks, offline: what passes here runs (or is queued)."""
    from .admission import check_manifest
    from .settings import OperatorSettings

    settings = OperatorSettings.from_env()
    bad = 0
    for path in args.manifests:
        try:
            with open(path) as f:
                docs = list(yaml.safe_load_all(f))
        except (OSError, yaml.YAMLError) as err:
            print(f"{path}: cannot read: {err}", file=sys.stderr)
            bad += 1
            continue
        for i, doc in enumerate(docs):
            if not isinstance(doc, dict) or doc.get("kind") not in (KIND, PIPELINE_KIND):
                continue
            raw_meta = doc.get("metadata")
            meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
            name = meta.get("name", f"<document {i}>")
            if doc["kind"] == PIPELINE_KIND:
                bad += _validate_pipeline(path, name, doc, settings)
                continue
            try:
                spec = check_manifest(doc, settings)
                print(f"{path}: {KIND}/{name}: valid")
                if args.plan:
                    from .planning import plan_warning

                    status, message = plan_warning(spec)
                    if status == "False":
                        print(f"{path}: {KIND}/{name}: warning: memory: {message}", file=sys.stderr)
            except SpecError as err:
                print(f"{path}: {KIND}/{name}: {err}", file=sys.stderr)
                bad += 1
    return 2 if bad else 0


def _validate_pipeline(path: str, name: str, doc: dict[str, Any], settings: Any) -> int:
    """1 when the DPOPipeline (or one of its stage DPOJobs) is invalid, with the field named."""
    from .pipeline_admission import check_pipeline_manifest

    try:
        check_pipeline_manifest(doc, settings)
    except SpecError as err:
        print(f"{path}: {PIPELINE_KIND}/{name}: {err}", file=sys.stderr)
        return 1
    print(f"{path}: {PIPELINE_KIND}/{name}: valid")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Exit 0 when every job fits (or cannot be judged), 1 when one may not fit, 2 when invalid."""
    from .model_source import ModelConfigUnavailable
    from .planning import plan_spec

    worst = 0
    with open(args.manifest) as f:
        docs = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == KIND]
    for doc in docs:
        name = (doc.get("metadata") or {}).get("name", "?")
        try:
            plan = plan_spec(parse_spec(doc.get("spec")), args.gpu_memory, args.model_config)
        except (SpecError, ModelConfigUnavailable, ValueError) as err:
            print(f"{args.manifest}: {KIND}/{name}: {err}", file=sys.stderr)
            worst = 2
            continue
        print(f"{KIND}/{name}\n{plan.render()}")
        if plan.fits is False:
            worst = max(worst, 1)
    return worst


def cmd_operator(args: argparse.Namespace) -> int:
    import kopf

    from .handlers import build_registry, make_memo
    from .kube import Kube, load_api_client
    from .metrics import OperatorMetrics
    from .settings import OperatorSettings

    settings = OperatorSettings.from_env()
    # kopf.configure keeps foreign root handlers: without this every line came out twice, once
    # as plain text from main()'s basicConfig and once as kopf's (JSON) line.
    logging.getLogger().handlers.clear()
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON if args.json_logs else kopf.LogFormat.FULL)
    metrics = OperatorMetrics()
    metrics.serve(settings.operator_metrics_port)
    namespaces = [n for n in settings.namespaces.split(",") if n]
    asyncio.run(kopf.operator(
        registry=build_registry(settings),
        memo=make_memo(Kube(load_api_client()), settings, metrics),
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=settings.liveness_endpoint or None,
        standalone=not settings.peering_name,
        peering_name=settings.peering_name or None,
        # kopf keeps one active replica per peering only if priorities differ.
        priority=random.randint(0, 32767) if settings.peering_name else 0,
    ))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .dashboard import render

    sys.stdout.write(render())
    return 0


def cmd_api_docs(args: argparse.Namespace) -> int:
    from .apidocs import render

    sys.stdout.write(render())
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from .alerts import render

    sys.stdout.write(render())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .local import run

    return run(args.manifest, log_format=args.log_format)


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    from .pipeline_local import run

    return run(args.manifest, log_format=args.log_format)


def cmd_pipeline_plan(args: argparse.Namespace) -> int:
    """The stages a DPOPipeline runs, each a DPOJob (with --spec: their specs as YAML)."""
    from .pipeline_local import load_pipeline_manifest

    try:
        name, _, _, stages = load_pipeline_manifest(args.manifest)
    except (SpecError, OSError, yaml.YAMLError) as err:
        print(f"{args.manifest}: {err}", file=sys.stderr)
        return 2
    for s in stages:
        if args.spec:
            sys.stdout.write(yaml.safe_dump({"apiVersion": "kubedpo.io/v1alpha1", "kind": KIND,
                                             "metadata": {"name": s.job_name}, "spec": s.wire_spec()},
                                            sort_keys=False, explicit_start=True))
        else:
            print(f"{s.job_name:<52} round {s.round:<3} {s.task:<8} -> {s.output_uri}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubedpo", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("crd", help="Print a CRD's YAML (DPOJob by default).")
    c.add_argument("--kind", choices=("DPOJob", "DPOPipeline"), default="DPOJob")
    c.set_defaults(fn=cmd_crd)
    sub.add_parser("dashboard", help="Print the Grafana dashboard JSON (needs the dev extra).").set_defaults(
        fn=cmd_dashboard)
    sub.add_parser("alerts", help="Print the Prometheus alerting rules (YAML).").set_defaults(fn=cmd_alerts)
    sub.add_parser("api-docs", help="Print docs/api.md (the DPOJob reference, from the CRD).").set_defaults(
        fn=cmd_api_docs)
    v = sub.add_parser("validate", help="Validate DPOJob and DPOPipeline manifests offline (exit 2 if any is invalid).")
    v.add_argument("manifests", nargs="+")
    v.add_argument("--no-plan", dest="plan", action="store_false",
                   help="Skip the memory estimate (it reads each model's config.json).")
    v.set_defaults(fn=cmd_validate)
    pl = sub.add_parser("plan", help="Estimate per-GPU memory of a DPOJob and the largest batch that fits.")
    pl.add_argument("manifest")
    pl.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                    help="GPU memory in GiB (default: from nodeSelector nvidia.com/gpu.product).")
    pl.add_argument("--model-config", default=None, metavar="CONFIG_JSON",
                    help="Read this config.json instead of the one at model.uri (e.g. no S3 access here).")
    pl.set_defaults(fn=cmd_plan)
    o = sub.add_parser("operator", help="Run the operator (settings from KUBEDPO_* env).")
    o.add_argument("--verbose", action="store_true")
    o.add_argument("--json-logs", action="store_true", help="Structured (JSON) log lines.")
    o.set_defaults(fn=cmd_operator)
    r = sub.add_parser("run", help="Run a DPOJob's workers as local processes (no cluster needed).")
    r.add_argument("manifest")
    r.add_argument("--log-format", choices=("auto", "json", "rich"), default=None,
                   help="rich: a live progress display; json: the pods' JSON lines; auto (default): rich on a terminal.")
    r.set_defaults(fn=cmd_run)
    pp = sub.add_parser("pipeline", help="DPOPipeline: SFT then rounds of generate -> judge -> train.")
    psub = pp.add_subparsers(dest="pipeline_command", required=True)
    pr = psub.add_parser("run", help="Run a DPOPipeline's stages locally, one after the other; a re-run "
                         "skips finished stages and resumes the interrupted one.")
    pr.add_argument("manifest")
    pr.add_argument("--log-format", choices=("auto", "json", "rich"), default=None,
                    help="rich: a live progress display per stage; json: the pods' JSON lines; auto: rich on a "
                    "terminal.")
    pr.set_defaults(fn=cmd_pipeline_run)
    pl2 = psub.add_parser("plan", help="Print the stages (DPOJobs) a DPOPipeline runs, in order.")
    pl2.add_argument("manifest")
    pl2.add_argument("--spec", action="store_true", help="Print each stage as a DPOJob manifest.")
    pl2.set_defaults(fn=cmd_pipeline_plan)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()
