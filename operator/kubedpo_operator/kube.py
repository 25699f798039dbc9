"""The few Kubernetes API calls the handlers make, on plain dicts (kubernetes client, sync).

Handlers are sync and kopf runs them in its thread pool, so the blocking client is fine.
Responses are read raw (`_preload_content=False`) to keep camelCase dicts, the same shape the
builders produce and the tests assert.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from .api import GROUP, PLURAL, VERSION


def load_api_client() -> kubernetes.client.ApiClient:
    """In-cluster service account first, then the user's kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.ApiClient()


def _raw(resp: Any) -> dict[str, Any]:
    return json.loads(resp.data)


class Kube:
    """Create/read/delete children and read/patch DPOJobs; 404 means "absent", never an error."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.net = kubernetes.client.NetworkingV1Api(api_client)

    def get_dpojob(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _raw(self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def patch_dpojob_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status})

    def delete_dpojob(self, namespace: str, name: str) -> None:
        self._ignore_404(self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                         name, propagation_policy="Background")

    def _reader(self, kind: str) -> Any:
        return {"ConfigMap": self.core.read_namespaced_config_map,
                "Service": self.core.read_namespaced_service,
                "Job": self.batch.read_namespaced_job,
                "NetworkPolicy": self.net.read_namespaced_network_policy}[kind]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _raw(self._reader(kind)(name, namespace, _preload_content=False))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def list_jobs(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """Jobs matching a selector (callers re-check labels and owner: never trust a list blindly)."""
        resp = self.batch.list_namespaced_job(namespace, label_selector=label_selector, _preload_content=False)
        return list(_raw(resp).get("items") or [])

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        resp = self.core.list_namespaced_pod(namespace, label_selector=label_selector, _preload_content=False)
        return list(_raw(resp).get("items") or [])

    def list_events(self, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
        """Events about one object (re-filtered here: a field selector is the server's filter)."""
        resp = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind={kind},involvedObject.name={name}",
            _preload_content=False)
        return [e for e in _raw(resp).get("items") or []
                if (e.get("involvedObject") or {}).get("name") == name
                and (e.get("involvedObject") or {}).get("kind") == kind]

    def create(self, obj: dict[str, Any]) -> bool:
        """Create unless it exists (409 → False): a second operator racing us is not an error."""
        ns = obj["metadata"]["namespace"]
        creators: dict[str, Callable[..., Any]] = {"ConfigMap": self.core.create_namespaced_config_map,
                                                   "Service": self.core.create_namespaced_service,
                                                   "Job": self.batch.create_namespaced_job,
                                                   "NetworkPolicy": self.net.create_namespaced_network_policy}
        creator = creators[obj["kind"]]
        try:
            creator(ns, obj, _preload_content=False)
            return True
        except ApiException as err:
            if err.status == 409:
                return False
            raise

    def delete(self, kind: str, namespace: str, name: str) -> None:
        deleter = {"ConfigMap": self.core.delete_namespaced_config_map,
                   "Service": self.core.delete_namespaced_service,
                   "Job": self.batch.delete_namespaced_job,
                   "NetworkPolicy": self.net.delete_namespaced_network_policy}[kind]
        # Background propagation: the Job's pods go too (orphaning them would keep GPUs busy).
        self._ignore_404(deleter, name, namespace, propagation_policy="Background")

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self._ignore_404(self.batch.patch_namespaced_job, name, namespace, patch)

    @staticmethod
    def _ignore_404(fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, _preload_content=False, **kwargs)
        except ApiException as err:
            if err.status != 404:
                raise
