"""`kubedpo`: the operator, the CRD generator and offline manifest checks.

    kubedpo crd > crds/kubedpo.io_dpojobs.yaml   # the CRD, generated from api.py
    kubedpo validate examples/tiny-cpu.yaml       # the CRD schema, the operator's checks and its children's
    kubedpo operator                              # run the kopf operator (in-cluster or kubeconfig)
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

from .api import KIND, SpecError


def cmd_crd(_: argparse.Namespace) -> int:
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
            if not isinstance(doc, dict) or doc.get("kind") != KIND:
                continue
            raw_meta = doc.get("metadata")
            meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
            name = meta.get("name", f"<document {i}>")
            try:
                check_manifest(doc, settings)
                print(f"{path}: {KIND}/{name}: valid")
            except SpecError as err:
                print(f"{path}: {KIND}/{name}: {err}", file=sys.stderr)
                bad += 1
    return 2 if bad else 0


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


def cmd_run(args: argparse.Namespace) -> int:
    from .local import run

    return run(args.manifest, log_format=args.log_format)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubedpo", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("crd", help="Print the DPOJob CRD YAML.").set_defaults(fn=cmd_crd)
    v = sub.add_parser("validate", help="Validate DPOJob manifests offline (exit 2 if any is invalid).")
    v.add_argument("manifests", nargs="+")
    v.set_defaults(fn=cmd_validate)
    o = sub.add_parser("operator", help="Run the operator (settings from KUBEDPO_* env).")
    o.add_argument("--verbose", action="store_true")
    o.add_argument("--json-logs", action="store_true", help="Structured (JSON) log lines.")
    o.set_defaults(fn=cmd_operator)
    r = sub.add_parser("run", help="Run a DPOJob's workers as local processes (no cluster needed).")
    r.add_argument("manifest")
    r.add_argument("--log-format", choices=("auto", "json", "rich"), default=None,
                   help="rich: a live progress display; json: the pods' JSON lines; auto (default): rich on a terminal.")
    r.set_defaults(fn=cmd_run)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()
