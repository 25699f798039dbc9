"""The operator at scale: N DPOJobs through a full lifecycle on kmock; API writes, latency, memory.

    .venv/bin/python bench/operator_scale.py                    # 500 DPOJobs, kopf in a thread
    .venv/bin/python bench/operator_scale.py --jobs 20          # smoke run, ~7 s
    .venv/bin/python bench/operator_scale.py --operator process --json out.json

Why: an operator's cost to a cluster is mostly API writes (each is an etcd write plus a watch
event to every watcher), and its use is how fast it reacts; both only show at scale. So this runs
the real kopf operator through the tests' harness (tests/operator/conftest.py: Emulator,
OperatorFactory, FakeCluster) against kmock's KubernetesEmulator, a real HTTP API, and plays the
Job controller for N DPOJobs of 2 workers: create DPOJob -> operator creates ConfigMap, Service,
Job -> bench sets Job active=2 -> DPOJob Running -> bench sets Job Complete -> DPOJob Succeeded.
All N start at once (bench requests at most --concurrency in flight): a burst, so latencies
include the backlog, and grow with N.

Measured: writes (POST/PATCH/PUT/DELETE) per DPOJob by origin and kind, from kmock's record of
every request; latencies from server-side timestamps taken when the emulator has committed each
write (exact, no polling); wall time until all N are Succeeded; RSS (VmRSS/VmHWM, getrusage
maxrss) and CPU seconds. `--operator thread` (default) is the harness as is: operator, emulator
and bench client share one process, one GIL and one RSS. `--operator process` runs the same
OperatorFactory in a child process: its own GIL (2 cores, like a separate API server) and RSS.

Settings are the operator's defaults except what an in-process run needs: no metrics or liveness
ports, metrics_timeout_s 0.5, and rank 0's metrics URL at a closed loopback port, so the progress
timer's fetch is refused at once instead of waiting on DNS names that do not exist here; kopf's
watch/batching settings are the harness's fast ones. kopf logs at INFO as `kubedpo operator`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/operator_scale.py` as well as `python -m bench.operator_scale`
    sys.path.insert(0, str(ROOT))

import attrs
import kmock

from kubedpo_operator.api import PLURAL
from kubedpo_operator.children import LABEL_JOB
from tests.operator import conftest
from tests.operator.conftest import Emulator, FakeCluster, OperatorFactory, minimal_spec

WRITES = ("POST", "PATCH", "PUT", "DELETE")
KINDS = {PLURAL: "DPOJob", "jobs": "Job", "services": "Service", "configmaps": "ConfigMap", "events": "Event"}


@attrs.define(kw_only=True)
class TimedEmulator(Emulator):
    """The tests' emulator, plus arrival times per request and a callback when a request succeeded.

    kmock's request records carry no time; stamping them where each write is committed gives
    exact latencies without polling, and lets the bench react to the operator as a watch would.

    `trim`: kmock matches each request to a reaction by scanning its whole request history for
    that request's identity (`request in reaction._source`), O(history) per request, so at 10k+
    requests the mock server, not the operator, would set every latency. Finished requests move
    to `archive` (same objects, nothing dropped); only in-flight ones stay where kmock scans.
    """

    trim: bool = True
    archive: list[Any] = attrs.field(factory=list, init=False)
    arrived: dict[int, float] = attrs.field(factory=dict, init=False)
    failed: set[int] = attrs.field(factory=set, init=False)
    on_commit: Callable[[Any, float], None] | None = attrs.field(default=None, init=False)
    _inflight: set[int] = attrs.field(factory=set, init=False)

    def history(self) -> list[Any]:
        """Every request so far, archived or still in kmock's list (keyed elsewhere by id())."""
        return [*self.archive, *self]

    async def _handle(self, request: Any) -> Any:
        self.arrived[id(request)] = time.perf_counter()
        self._inflight.add(id(request))
        if self.trim:
            self.archive.extend(r for r in self._requests if id(r) not in self._inflight)
            self._requests[:] = [r for r in self._requests if id(r) in self._inflight]
        try:
            response = await super()._handle(request)
        except Exception:
            self.failed.add(id(request))
            raise
        finally:
            self._inflight.discard(id(request))
        if self.on_commit is not None and request.resource is not None:
            self.on_commit(request, time.perf_counter())
        return response


class Tracker:
    """Futures resolved by the emulator's commits: (event, DPOJob name) -> commit time.

    Events: "dpojob" (created), "job" (its Job created), "active" / "complete" (the bench's Job
    status writes), and each status.phase the operator writes ("Pending", "Running", ...).
    """

    def __init__(self, emulator: TimedEmulator) -> None:
        self.emulator = emulator
        self.futures: dict[tuple[str, str], asyncio.Future[float]] = {}

    def future(self, what: str, name: str) -> asyncio.Future[float]:
        return self.futures.setdefault((what, name), asyncio.get_running_loop().create_future())

    def _fire(self, what: str, name: str, t: float) -> None:
        if not (fut := self.future(what, name)).done():
            fut.set_result(t)

    def __call__(self, request: Any, t: float) -> None:
        plural, action = request.resource.plural, request.action
        if action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.get("metadata") or {}
            if plural == "jobs":
                self._fire("job", (meta.get("labels") or {}).get(LABEL_JOB, ""), t)
            elif plural == PLURAL:
                self._fire("dpojob", meta.get("name", ""), t)
        elif action == kmock.action.UPDATE and request.subresource == "status":
            key, objects = (request.resource, request.namespace, request.name), self.emulator.objects
            status = (objects[key].get("status") if key in objects else None) or {}
            owner = request.name.rsplit("-", 1)[0]  # Job <dpojob>-<attempt>
            complete = any(c.get("type") == "Complete" for c in status.get("conditions") or [])
            if plural == PLURAL and status.get("phase"):
                self._fire(status["phase"], request.name, t)
            elif plural == "jobs" and complete:
                self._fire("complete", owner, t)
            elif plural == "jobs" and status.get("active"):
                self._fire("active", owner, t)


def usage() -> dict[str, float]:
    """RSS and peak RSS (MiB) from /proc/self/status, getrusage's maxrss, CPU seconds so far."""
    lines = Path("/proc/self/status").read_text().splitlines()
    kib = {k: int(v.split()[0]) for k, _, v in (ln.partition(":") for ln in lines) if k in ("VmRSS", "VmHWM")}
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"rss_mib": kib["VmRSS"] / 1024, "hwm_mib": kib["VmHWM"] / 1024,
            "maxrss_mib": ru.ru_maxrss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connects are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float]) -> dict[str, float]:
    """n, p50/p99/max in ms (inclusive quantiles: p99 of few samples stays within the data)."""
    if len(values) < 2:
        return {"n": len(values), **{k: max(values, default=float("nan")) * 1e3 for k in ("p50_ms", "p99_ms",
                                                                                      "max_ms")}}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"n": len(values), "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "max_ms": max(values) * 1e3}


def count_requests(emulator: TimedEmulator, since: float) -> tuple[Counter[str], Counter[str], int]:
    """Writes by "origin Kind[/sub] VERB", failed writes likewise, and the operator's GETs (no watches).

    Origin: the bench's client is kmock's own (User-Agent kmock/...); everything else is the
    operator (kubernetes client for children and status, kopf for annotations and Events).
    """
    writes: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    reads = 0
    for r in emulator.history():
        if emulator.arrived.get(id(r), 0.0) < since or r.resource is None:
            continue
        agent = {k.lower(): v for k, v in r.headers.items()}.get("user-agent", "")
        origin = "bench" if agent.startswith("kmock/") else "operator"
        method = str(getattr(r.method, "value", r.method)).upper()
        if method == "GET" and origin == "operator" and r.params.get("watch") not in ("true", "1"):
            reads += 1
        if method in WRITES:
            key = f"{origin} {KINDS.get(r.resource.plural, r.resource.plural)}"
            key += f"{'/' + r.subresource if r.subresource else ''} {method}"
            writes[key] += 1
            failed[key] += id(r) in emulator.failed
    return writes, +failed, reads


class OperatorHandle:
    """The operator under test: kopf in a thread here (the harness as is), or in a child process.

    The child runs the same OperatorFactory (`--serve-operator`), so the operator gets its own GIL
    (2 cores: like a separate API server) and its own RSS, which it reports as JSON lines.
    """

    def __init__(self, mode: str) -> None:
        self.mode, self.op, self.proc = mode, None, None
        self.mem: dict[str, dict[str, float]] = {}

    async def start(self, emulator: TimedEmulator, overrides: dict[str, Any]) -> None:
        if self.mode == "thread":
            self.op = await OperatorFactory(emulator).start(**overrides)
            return
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve-operator", str(emulator.url).rstrip("/"),
            json.dumps(overrides), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self.mem.update(json.loads(await self.proc.stdout.readline()))

    async def stop(self) -> None:
        """Stop kopf; a child first reports its usage at the end."""
        if self.op is not None:
            try:
                await self.op.shutdown()
            except AssertionError as err:
                print(f"warning: {err}", file=sys.stderr)
        elif self.proc is not None:
            self.proc.stdin.write(b"end\n")
            self.mem.update(json.loads(await self.proc.stdout.readline()))
            self.proc.stdin.close()
            await asyncio.wait_for(self.proc.wait(), 60)


async def serve_operator(url: str, overrides: str) -> None:
    """Child mode: kopf via OperatorFactory against `url`, usage as JSON lines, until told to stop."""
    logging.getLogger("kopf").setLevel(logging.INFO)
    mem = {"baseline": usage()}
    op = await OperatorFactory(SimpleNamespace(url=url)).start(**json.loads(overrides))
    print(json.dumps({**mem, "operator_started": usage()}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    print(json.dumps({"end": usage()}), flush=True)
    await op.shutdown()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("kopf").setLevel(logging.INFO)  # as `kubedpo operator`; nothing prints INFO here
    mem: dict[str, dict[str, float]] = {"baseline": usage()}
    operator = OperatorHandle(args.operator)
    async with TimedEmulator(trim=not args.no_trim) as emulator, kmock.Server(emulator):
        getattr(conftest.cluster, "__wrapped__", conftest.cluster)(emulator)  # the fixture's resources
        cluster, tracker = FakeCluster(emulator), Tracker(emulator)
        emulator.on_commit = tracker
        await operator.start(emulator, {
            "progress_interval_s": args.progress_interval, "handler_backoff_s": 10.0,
            "metrics_timeout_s": 0.5, "metrics_url_template": f"http://127.0.0.1:{closed_port()}/metrics"})
        await asyncio.sleep(1.0)  # kopf's watches settle
        mem["operator_started"] = usage()
        since, sem = time.perf_counter(), asyncio.Semaphore(args.concurrency)

        async def lifecycle(name: str) -> None:
            async with sem:
                await cluster.create_dpojob(name, minimal_spec(workers=2))
            await tracker.future("job", name)
            async with sem:
                await cluster.set_job(f"{name}-0", active=2)
            await tracker.future("Running", name)
            async with sem:
                await cluster.set_job(f"{name}-0", succeeded=2, condition="Complete")
            await tracker.future("Succeeded", name)

        names = [f"bench-{i:05d}" for i in range(args.jobs)]
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(lifecycle(n)) for n in names]
        done, pending = await asyncio.wait(tasks, timeout=args.timeout)
        wall = time.perf_counter() - t0
        for task in pending:
            task.cancel()
        errors = [repr(t.exception()) for t in done if t.exception()]
        await asyncio.sleep(args.settle)  # trailing writes (kopf posts Events in the background)
        mem["end"] = usage()
        await operator.stop()
        writes, failed, reads = count_requests(emulator, since)

    def span(a: str, b: str) -> list[float]:
        pairs = [(tracker.futures.get((a, n)), tracker.futures.get((b, n))) for n in names]
        return [fb.result() - fa.result() for fa, fb in pairs if fa and fb and fa.done() and fb.done()]

    n = args.jobs
    return {
        "jobs": n, "operator": args.operator, "succeeded": len(span("dpojob", "Succeeded")),
        "timed_out": len(pending), "errors": errors[:5], "wall_s": wall, "concurrency": args.concurrency,
        "progress_interval_s": args.progress_interval, "settle_s": args.settle,
        "latency_source": "server-side commit timestamps (exact, no polling)",
        "latency": {k: pct(span(a, b)) for k, (a, b) in {
            "create_to_job": ("dpojob", "job"), "active_to_running": ("active", "Running"),
            "complete_to_succeeded": ("complete", "Succeeded"),
            "create_to_succeeded": ("dpojob", "Succeeded")}.items()},
        "writes_total": sum(writes.values()),
        "operator_writes_per_job": sum(v for k, v in writes.items() if k.startswith("operator")) / n,
        "writes_per_job": {k: v / n for k, v in sorted(writes.items())},
        "failed_writes": dict(failed), "operator_reads_per_job": reads / n,
        "usage": {"operator + emulator + bench": mem} if args.operator == "thread"
        else {"operator": operator.mem, "emulator + bench": mem},
    }


def report(res: dict[str, Any]) -> None:
    print(f"{res['jobs']} DPOJobs (2 workers each), operator in a {res['operator']}: "
          f"{res['succeeded']} Succeeded, {res['timed_out']} timed out; "
          f"wall to converge all: {res['wall_s']:.1f} s")
    print("\n| writes per DPOJob (origin, kind, verb) | per job |\n|---|---|")
    for k, v in res["writes_per_job"].items():
        print(f"| {k} | {v:.2f} |")
    print(f"| **operator writes, total** | **{res['operator_writes_per_job']:.2f}** |")
    print(f"| operator reads (GET, not watches) | {res['operator_reads_per_job']:.2f} |")
    if res["failed_writes"]:
        print(f"failed writes (409/422/...): {res['failed_writes']}")
    print(f"\n| latency ({res['latency_source']}) | n | p50 (ms) | p99 (ms) | max (ms) |")
    print("|---|---|---|---|---|")
    for k, v in res["latency"].items():
        print(f"| {k} | {v['n']} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {v['max_ms']:.1f} |")
    print("\n| process | when | VmRSS (MiB) | VmHWM (MiB) | ru_maxrss (MiB) | CPU (s) |")
    print("|---|---|---|---|---|---|")
    for proc, m in res["usage"].items():
        for k, v in m.items():
            print(f"| {proc} | {k} | {v['rss_mib']:.1f} | {v['hwm_mib']:.1f} | {v['maxrss_mib']:.1f} "
                  f"| {v['cpu_s']:.1f} |")
        for a in ("baseline", "operator_started"):
            print(f"| {proc} | end - {a} | {m['end']['rss_mib'] - m[a]['rss_mib']:.1f} | | "
                  f"| {m['end']['cpu_s'] - m[a]['cpu_s']:.1f} |")
    if res["errors"]:
        print(f"errors: {res['errors']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=500, help="DPOJobs to run through a lifecycle.")
    p.add_argument("--operator", choices=["thread", "process"], default="thread",
                   help="kopf in a thread of this process (the tests' harness) or in its own process.")
    p.add_argument("--concurrency", type=int, default=50, help="Bench requests in flight at most.")
    p.add_argument("--progress-interval", type=float, default=15.0, help="The operator's tick (s).")
    p.add_argument("--settle", type=float, default=3.0, help="Wait for trailing writes after the last (s).")
    p.add_argument("--timeout", type=float, default=900.0, help="Give up on DPOJobs not Succeeded by then.")
    p.add_argument("--no-trim", action="store_true", help="Keep kmock's O(history) request matching.")
    p.add_argument("--json", type=Path, help="Write the results here.")
    p.add_argument("--serve-operator", nargs=2, metavar=("URL", "SETTINGS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_operator:
        asyncio.run(serve_operator(*args.serve_operator))
        return 0
    res = asyncio.run(run(args))
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if res["succeeded"] == res["jobs"] else 1


if __name__ == "__main__":
    sys.exit(main())
