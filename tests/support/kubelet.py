"""A test-only stand-in for the Job controller and the kubelet: Jobs become local processes.

Mocked because neither a kubelet nor a container runtime can run here. It plays exactly the
parts kubedpo depends on, from the objects the operator wrote to the (emulated) API server:

- a Job that is not suspended gets `completions` pods, each the container's command and args
  as a local process group with the container's env (literal values, and `envFrom` Secrets
  read from the API), `JOB_COMPLETION_INDEX`, and the ConfigMap volume written to a folder;
- what only a cluster network provides is rewritten: the rendezvous address (a pod DNS name)
  becomes 127.0.0.1 and each Job gets its own free port (pods have their own network namespace);
- the Job controller's verdict is written to the Job's status: `active`, then `Complete` when
  every index exits 0, or `Failed` on the first failing pod, with the podFailurePolicy message
  the real controller writes ("... exit code N matching FailJob rule at index K") or
  BackoffLimitExceeded (backoffLimit is 0). The other pods of a failed Job are terminated
  (SIGTERM, SIGKILL after the pod's grace period), as the controller does;
- each pod is also an API object (labels as the Job controller sets them, with the completion
  index), Running while its process lives and, once it exited, `terminated` with its exit code
  and the termination message: the container's terminationMessagePath (/dev/termination-log,
  where KUBEDPO_RESULT_FILE points) is rewritten to a file of the pod's, read back at exit and
  cut at 4096 bytes as the kubelet does. Pods are written before the Job's verdict, as in a
  cluster, where the kubelet reports a pod's end before the Job controller counts it;
- a deleted Job's processes are killed and its pod objects deleted, as the garbage collector and
  kubelet would.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kubedpo_operator.settings import OperatorSettings

from .runs import free_port

SIGNAL_EXIT_BASE = 128  # a container killed by signal N reports exit code 128 + N
TERMINATION_MESSAGE_MAX = 4096  # the kubelet keeps at most this many bytes of a termination message
INDEX_KEY = "batch.kubernetes.io/job-completion-index"


@dataclass
class Pod:
    name: str
    index: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    message_path: Path | None = None
    reported: bool = False

    @property
    def exit_code(self) -> int | None:
        code = self.proc.poll()
        if code is None:
            return None
        return SIGNAL_EXIT_BASE - code if code < 0 else code

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the whole pod: launcher and its ranks
        except ProcessLookupError:
            pass


@dataclass
class RunningJob:
    name: str
    pods: list[Pod]
    grace_s: float
    finished: bool = False


@dataclass
class StandInKubelet:
    """Polls the emulator's Jobs and runs their pods; `kill(job, index)` simulates a node loss."""

    cluster: Any  # tests.operator.conftest.FakeCluster
    workdir: Path
    settings: OperatorSettings
    namespace: str
    base_env: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, RunningJob] = field(default_factory=dict)
    max_grace_s: float = 20.0

    async def run(self, interval: float = 0.1) -> None:
        try:
            while True:
                await self.sync()
                await asyncio.sleep(interval)
        finally:
            for job in self.jobs.values():
                for pod in job.pods:
                    pod.signal(signal.SIGKILL)
                    pod.proc.wait()
                    pod.log.close()

    async def sync(self) -> None:
        present = {j["metadata"]["name"]: j for j in await self.cluster.list("Job")}
        for name, job in list(self.jobs.items()):
            if name not in present and not job.finished:
                await self._terminate(job, grace_s=0)  # deleted: its pods go with it
                job.finished = True
                for pod in job.pods:
                    await self.cluster.delete("Pod", pod.name)
        for name, obj in present.items():
            if name not in self.jobs and not obj["spec"].get("suspend") and not (obj.get("status") or {}).get(
                    "conditions"):
                self.jobs[name] = await self._start(obj)
                await self.cluster.patch("Job", name, {"status": {"active": len(self.jobs[name].pods),
                                                                    "ready": len(self.jobs[name].pods)}},
                                         status=True)
            elif name in self.jobs and not self.jobs[name].finished:
                await self._judge(self.jobs[name], obj)

    def pod(self, job: str, index: int) -> Pod:
        return self.jobs[job].pods[index]

    def kill(self, job: str, index: int) -> None:
        """SIGKILL one pod's processes, like a node that vanished (exit 137, no disruption condition)."""
        self.pod(job, index).signal(signal.SIGKILL)

    def logs(self, job: str) -> str:
        return "".join(f"--- {p.name}\n{p.log_path.read_text(errors='replace')}" for p in self.jobs[job].pods)

    async def _start(self, job: dict[str, Any]) -> RunningJob:
        name = job["metadata"]["name"]
        pod_spec = job["spec"]["template"]["spec"]
        container = pod_spec["containers"][0]
        root = self.workdir / name
        config_dir = await self._mount_config(pod_spec, root / "config")
        args = self._rewrite_args(container.get("args", []), config_dir)
        cmd = [sys.executable if c == self.settings.python else c for c in container["command"]] + args
        env = {**self.base_env, **await self._container_env(container)}
        message_in_pod = container.get("terminationMessagePath", "/dev/termination-log")
        pods = []
        for index in range(int(job["spec"]["completions"])):
            pod_name = f"{name}-{index}"
            tmp = root / pod_name / "tmp"  # the pod's emptyDir /tmp
            tmp.mkdir(parents=True)
            log_path = root / pod_name / "log.txt"
            message = root / pod_name / "termination-log"  # the container's terminationMessagePath
            pod_env = {k: str(message) if v == message_in_pod else v for k, v in env.items()}
            log = open(log_path, "wb")  # noqa: SIM115 - closed when the kubelet stops
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**pod_env, "JOB_COMPLETION_INDEX": str(index), "HOSTNAME": pod_name, "TMPDIR": str(tmp),
                     "KUBEDPO_CACHE_DIR": str(tmp / "cache")})
            pods.append(Pod(pod_name, index, proc, log_path, log, message))
            await self._create_pod(job, pod_name, index, container["name"])
        grace = float(pod_spec.get("terminationGracePeriodSeconds", 30))
        return RunningJob(name, pods, min(grace, self.max_grace_s))

    async def _create_pod(self, job: dict[str, Any], pod_name: str, index: int, container: str) -> None:
        """The pod object the Job controller creates and the kubelet reports on: Running now."""
        labels = {**((job["spec"]["template"].get("metadata") or {}).get("labels") or {}),
                  "batch.kubernetes.io/job-name": job["metadata"]["name"], INDEX_KEY: str(index)}
        await self.cluster.create("Pod", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": self.namespace, "labels": labels,
                         "annotations": {INDEX_KEY: str(index)}},
            "spec": job["spec"]["template"]["spec"],
            "status": {"phase": "Running", "containerStatuses": [
                {"name": container, "ready": True, "state": {"running": {}}}]}})

    async def _report_exits(self, job: RunningJob) -> None:
        """Each exited pod's container status, with the termination message it left in its file."""
        for pod in job.pods:
            code = pod.exit_code
            if code is None or pod.reported:
                continue
            pod.reported = True
            terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
            if pod.message_path is not None and pod.message_path.exists():
                text = pod.message_path.read_bytes()[:TERMINATION_MESSAGE_MAX].decode(errors="replace")
                if text:
                    terminated["message"] = text
            await self.cluster.patch("Pod", pod.name, {"status": {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [{"name": "trainer", "ready": False, "state": {"terminated": terminated}}]}})

    async def _mount_config(self, pod_spec: dict[str, Any], target: Path) -> Path:
        target.mkdir(parents=True)
        for vol in pod_spec.get("volumes", []):
            if "configMap" in vol:
                cm = await self.cluster.get("ConfigMap", vol["configMap"]["name"])
                assert cm is not None, f"pod volume {vol['name']}: ConfigMap {vol['configMap']['name']} missing"
                for key, text in cm["data"].items():
                    (target / key).write_text(text)
        return target

    def _rewrite_args(self, args: list[str], config_dir: Path) -> list[str]:
        out = [a.replace(self.settings.config_mount_path, str(config_dir)) for a in args]
        port = str(free_port())
        for flag, value in (("--master-addr", "127.0.0.1"), ("--master-port", port)):
            if flag in out:
                out[out.index(flag) + 1] = value
        return out

    async def _container_env(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for ref in container.get("envFrom", []):
            secret = await self.cluster.get("Secret", ref["secretRef"]["name"])
            assert secret is not None, f"envFrom: Secret {ref['secretRef']['name']} missing"
            env.update({k: base64.b64decode(v).decode() for k, v in secret["data"].items()})
        for e in container.get("env", []):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref is not None:
                secret = await self.cluster.get("Secret", ref["name"])
                assert secret is not None, f"env {e['name']}: Secret {ref['name']} missing"
                env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
                continue
            assert "value" in e, f"env {e['name']}: only literal values and Secrets are played here"
            env[e["name"]] = str(e["value"])
        return env

    async def _judge(self, job: RunningJob, obj: dict[str, Any]) -> None:
        """The Job controller's verdict once a pod failed or all succeeded."""
        codes = [p.exit_code for p in job.pods]
        failed = next((p for p in job.pods if p.exit_code not in (None, 0)), None)
        if failed is not None:
            code = failed.exit_code
            await self._terminate(job, job.grace_s)
            await self._report_exits(job)
            rule = _matching_fail_rule(obj["spec"].get("podFailurePolicy") or {}, code)
            if rule is not None:
                reason = "PodFailurePolicy"
                message = (f"Container trainer for pod {self.namespace}/{failed.name} failed with exit code "
                           f"{code} matching FailJob rule at index {rule}")
            else:
                reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
            await self._finish(job, {"active": 0, "failed": 1, "succeeded": sum(c == 0 for c in codes)},
                               "Failed", reason, message)
        elif all(c == 0 for c in codes):
            await self._report_exits(job)
            await self._finish(job, {"active": 0, "succeeded": len(codes)}, "Complete", "CompletionsReached",
                               "Reached expected number of succeeded pods")

    async def _finish(self, job: RunningJob, counts: dict[str, int], cond: str, reason: str, message: str) -> None:
        job.finished = True
        status = {**counts, "ready": 0,
                  "conditions": [{"type": cond, "status": "True", "reason": reason, "message": message}]}
        await self.cluster.patch("Job", job.name, {"status": status}, status=True)

    @staticmethod
    async def _terminate(job: RunningJob, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after the grace period; polled, so the emulator's loop keeps serving."""
        live = [p for p in job.pods if p.exit_code is None]
        for p in live:
            p.signal(signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
        deadline = time.monotonic() + grace_s
        while any(p.exit_code is None for p in live) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in live:
            if p.exit_code is None:
                p.signal(signal.SIGKILL)
                await asyncio.to_thread(p.proc.wait)


def _matching_fail_rule(policy: dict[str, Any], code: int) -> int | None:
    """Index of the first FailJob rule whose onExitCodes match (the Job controller's order)."""
    for i, rule in enumerate(policy.get("rules", [])):
        on = rule.get("onExitCodes")
        if rule.get("action") != "FailJob" or not on:
            continue
        hit = code in on["values"]
        if hit == (on.get("operator", "In") == "In"):
            return i
    return None
