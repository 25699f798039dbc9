"""The operator for real (kopf) against kmock's KubernetesEmulator, a real HTTP Kubernetes API.

The emulator runs no controllers, so tests play the Job controller (`FakeCluster.set_job`)
and the garbage collector where it matters. `operator` starts kopf in a task with a fresh
registry and stops it on teardown; a test may start a second one to simulate a restart.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import attrs
import jsonpatch
import kmock
import kopf
import kubernetes
import pytest

from kubedpo_operator.api import GROUP, PLURAL, VERSION
from kubedpo_operator.handlers import build_registry, make_memo
from kubedpo_operator.kube import Kube
from kubedpo_operator.pipeline_api import PIPELINE_PLURAL
from kubedpo_operator.settings import OperatorSettings

NS = "team-a"
DPO = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"
PATHS = {
    "DPOJob": DPO,
    "DPOPipeline": f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PIPELINE_PLURAL}",
    "Job": f"/apis/batch/v1/namespaces/{NS}/jobs",
    "Service": f"/api/v1/namespaces/{NS}/services",
    "ConfigMap": f"/api/v1/namespaces/{NS}/configmaps",
    "Event": f"/api/v1/namespaces/{NS}/events",
    "Pod": f"/api/v1/namespaces/{NS}/pods",
    "NetworkPolicy": f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies",
    "Secret": f"/api/v1/namespaces/{NS}/secrets",
}
VERBS = ["list", "watch", "get", "create", "patch", "update", "delete"]


def minimal_spec(**extra: Any) -> dict[str, Any]:
    return {
        "model": {"uri": "s3://models/tiny/"},
        "data": {"train": "s3://prefs/train/"},
        "checkpoint": {"uri": "s3://runs/ckpt/", "everySteps": 10},
        "output": {"uri": "s3://runs/final/"},
        **extra,
    }


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus what the API server assigns: uid, resourceVersion, creationTimestamp.

    kopf patches with a JSON-patch `test` of metadata.resourceVersion and adopts with the
    owner's uid, so both must exist. Bumped on every create and update like the real server.
    """

    _rv: int = attrs.field(default=0, init=False)
    # Answer-before-storing hooks: kmock's reactions override the response but still store the
    # object, which is not what a real API server does with a request it refuses (422, 429...).
    refusals: list[Callable[[Any], Any]] = attrs.field(factory=list, init=False)
    # Faults that act before the emulator applies a request: each returns the error to answer
    # with, a delay in seconds (the request is applied after it, so others can overtake it), or None.
    faults: list[Callable[[Any], Exception | float | None]] = attrs.field(factory=list, init=False)

    async def _handle(self, request: Any) -> Any:
        for refuse in self.refusals:
            response = refuse(request)
            if response is not None:
                return response
        for fault in self.faults:
            outcome = fault(request)
            if isinstance(outcome, Exception):
                raise outcome
            if outcome is not None:
                await asyncio.sleep(outcome)
        if request.resource is not None and isinstance(request.data, dict | list):
            self._rv += 1
            rv = str(self._rv)
            data = request.data
            if request.action == kmock.action.CREATE and isinstance(data, dict):
                meta = {"uid": str(uuid.uuid4()), "creationTimestamp": _now(), **data.get("metadata", {}),
                        "resourceVersion": rv}
                if "name" not in meta and "generateName" in meta:  # events are created this way
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:12]  # 5 chars collided at 1500 events
                _set_data(request, {**data, "metadata": meta})
            elif request.action == kmock.action.UPDATE and isinstance(data, dict):
                meta = {**(data.get("metadata") or {}), "resourceVersion": rv}
                generation = self._next_generation(request, data)
                if generation is not None:
                    meta["generation"] = generation
                _set_data(request, {**data, "metadata": meta})
            elif request.action == kmock.action.UPDATE and isinstance(data, list):
                _set_data(request, [
                    *data, {"op": "add", "path": "/metadata/resourceVersion", "value": rv}])
        if request.resource is not None and request.action == kmock.action.DELETE and request.name:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                self._rv += 1  # setting deletionTimestamp is a write: the real server bumps the version
                self.objects[key].patch({"metadata": {"resourceVersion": str(self._rv)}})
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as err:  # kopf expects 422 on a stale resourceVersion
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(err)) from None


    def _next_generation(self, request: Any, patch: dict[str, Any]) -> int | None:
        """The generation a merge patch of an object leaves: + 1 when it changes the spec, as the
        API server does (never for status or metadata alone); None for a patch without spec."""
        key = (request.resource, request.namespace, request.name)
        if request.subresource is not None or not request.name or key not in self.objects:
            return None
        stored = self.objects[key]
        if stored.deleted or "spec" not in patch:
            return None
        if not _merge_changes(patch["spec"], stored.get("spec")):
            return int((stored.get("metadata") or {}).get("generation") or 1)
        return int((stored.get("metadata") or {}).get("generation") or 1) + 1

    async def _serve_list(self, request: Any) -> Any:
        result = dict(await super()._serve_list(request))
        return {**result, "metadata": {"resourceVersion": str(self._rv)}}

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        """Like kmock's, but the bus is marked while listing, so no event between is lost."""
        yield b""
        bus = self._buses[request.resource]
        since = request.params.get("resourceVersion", "")
        since_rv = int(since) if since.isdigit() else 0  # a watch from a list's version replays only newer
        async with self._lock:
            mark = await bus.mark()
            events = [{"type": "ADDED", "object": obj.raw} for (res, ns, _), obj in self.objects.items()
                      if res == request.resource and request.namespace in (None, ns) and not obj.deleted
                      and int(obj.get("metadata", {}).get("resourceVersion") or 0) > since_rv]
        try:
            for event in events:
                yield event
            async for event in bus.stream(since=mark):
                if request.namespace in (None, event.get("object", {}).get("metadata", {}).get("namespace")):
                    yield event
        finally:
            await bus.unmark(mark)


def _merge_changes(patch: Any, current: Any) -> bool:
    """Whether applying merge patch `patch` to `current` changes it."""
    if not isinstance(patch, dict) or not isinstance(current, dict):
        return patch != current
    return any(_merge_changes(v, current.get(k)) if v is not None else k in current for k, v in patch.items())


def _set_data(request: Any, data: Any) -> None:
    # Request is frozen, and kmock matches reactions by the identity of the recorded request.
    object.__setattr__(request, "data", data)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture()
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    return {**kmock_options, "cls": Emulator}


@dataclass
class FakeCluster:
    """HTTP helpers on the emulator, plus the Job controller's and GC's roles."""

    emulator: Any

    async def _call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "patch" else {}
        async with getattr(self.emulator, method)(path, headers=headers, **kw) as resp:
            return resp.status, await resp.json(content_type=None)

    async def get(self, kind: str, name: str) -> dict | None:
        code, body = await self._call("get", f"{PATHS[kind]}/{name}")
        return body if code == 200 else None

    async def list(self, kind: str) -> list[dict]:
        _, body = await self._call("get", PATHS[kind])
        return body.get("items", [])

    async def create_dpojob(self, name: str, spec: dict[str, Any]) -> dict:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DPOJob",
                "metadata": {"name": name, "namespace": NS, "uid": str(uuid.uuid4()), "generation": 1},
                "spec": spec}
        code, out = await self._call("post", DPO, json=body)
        assert code in (200, 201), out.get("message")
        return out

    async def create_pipeline(self, name: str, spec: dict[str, Any]) -> dict:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DPOPipeline",
                "metadata": {"name": name, "namespace": NS, "uid": str(uuid.uuid4()), "generation": 1},
                "spec": spec}
        return await self.create("DPOPipeline", body)

    async def create(self, kind: str, body: dict[str, Any]) -> dict:
        code, out = await self._call("post", PATHS[kind], json=body)
        assert code in (200, 201), out
        return out

    async def patch(self, kind: str, name: str, patch: dict, status: bool = False) -> None:
        code, out = await self._call("patch", f"{PATHS[kind]}/{name}{'/status' if status else ''}", json=patch)
        assert code == 200, out

    async def set_job(self, name: str, *, active: int = 0, succeeded: int = 0, failed: int = 0,
                      condition: str | None = None, reason: str = "", message: str = "",
                      ready: int | None = None) -> None:
        """Play the Job controller: write what it would write into a Job's status.

        `ready` (pods running and ready) defaults to `active`: the pods started and run.
        """
        st: dict[str, Any] = {"active": active, "succeeded": succeeded, "failed": failed,
                              "ready": active if ready is None else ready}
        if condition:
            st["conditions"] = [{"type": condition, "status": "True", "reason": reason, "message": message}]
        await self.patch("Job", name, {"status": st}, status=True)

    async def delete(self, kind: str, name: str) -> None:
        await self._call("delete", f"{PATHS[kind]}/{name}")

    async def status(self, name: str) -> dict:
        return ((await self.get("DPOJob", name)) or {}).get("status") or {}

    def creates(self, kind: str) -> int:
        """POST requests to a kind's collection so far (what "no duplicates" counts)."""
        path = PATHS[kind]
        return sum(1 for r in self.emulator if r.method == "POST" and r.url.path == path)

    async def events(self, name: str) -> list[dict]:
        return [e for e in await self.list("Event") if e.get("involvedObject", {}).get("name") == name]


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll an async or sync predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met in {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


@pytest.fixture()
def cluster(kmock: Any) -> FakeCluster:
    res = kmock.resources
    res["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=VERBS)
    res[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
        kind="DPOJob", namespaced=True, verbs=VERBS, subresources=["status"], shortnames=["dpoj"])
    res[f"{GROUP}/{VERSION}/{PIPELINE_PLURAL}"] = kmock.ResourceInfo(
        kind="DPOPipeline", namespaced=True, verbs=VERBS, subresources=["status"], shortnames=["dpop"])
    res["batch/v1/jobs"] = kmock.ResourceInfo(kind="Job", namespaced=True, verbs=VERBS, subresources=["status"])
    res["v1/services"] = kmock.ResourceInfo(kind="Service", namespaced=True, verbs=VERBS)
    res["v1/configmaps"] = kmock.ResourceInfo(kind="ConfigMap", namespaced=True, verbs=VERBS)
    res["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs=VERBS)
    res["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True, verbs=VERBS)
    res["networking.k8s.io/v1/networkpolicies"] = kmock.ResourceInfo(kind="NetworkPolicy", namespaced=True,
                                                                     verbs=VERBS)
    res["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True, verbs=VERBS)
    res["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=VERBS)  # kopf waits for it
    return FakeCluster(kmock)


@dataclass
class RunningOperator:
    thread: threading.Thread
    stop: threading.Event
    memo: Any

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.to_thread(self.thread.join, 20)
        assert not self.thread.is_alive(), "kopf did not stop"


@dataclass
class OperatorFactory:
    """Starts kopf in its own thread and event loop.

    kopf cancels every task created in its loop after it started (it cannot tell its own from
    others), which would kill the emulator's connection handlers if both shared one loop.
    """

    kmock: Any
    running: list[RunningOperator] = field(default_factory=list)

    async def start(self, **overrides: Any) -> RunningOperator:
        url = str(self.kmock.url).rstrip("/")
        settings = OperatorSettings(**{"progress_interval_s": 0.3, "operator_metrics_port": 0,
                                       "liveness_endpoint": "", "handler_backoff_s": 0.2,
                                       **overrides})
        registry = build_registry(settings, login=False)

        @kopf.on.login(registry=registry)
        def _login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, insecure=True)

        @kopf.on.startup(registry=registry)
        def _fast(settings: kopf.OperatorSettings, **_: Any) -> None:
            settings.watching.server_timeout = 1
            settings.watching.reconnect_backoff = 0.1
            settings.networking.error_backoffs = [0.05, 0.1, 0.2]
            settings.batching.idle_timeout = 0.05
            settings.batching.batch_window = 0.01
            settings.batching.exit_timeout = 0.5

        memo = make_memo(Kube(kubernetes.client.ApiClient(kubernetes.client.Configuration(host=url))), settings)
        stop, ready = threading.Event(), threading.Event()
        coro = kopf.operator(registry=registry, memo=memo, clusterwide=True, standalone=True,
                             stop_flag=stop, ready_flag=ready)
        thread = threading.Thread(target=asyncio.run, args=(coro,), name="kopf", daemon=True)
        thread.start()
        assert await asyncio.to_thread(ready.wait, 10), "kopf did not become ready"
        op = RunningOperator(thread, stop, memo)
        self.running.append(op)
        return op


@pytest.fixture()
async def operator(cluster: FakeCluster, kmock: Any) -> AsyncIterator[OperatorFactory]:
    logging.getLogger("kopf").setLevel(logging.INFO)
    factory = OperatorFactory(kmock)
    yield factory
    for op in factory.running:
        await op.shutdown()

