"""The API calls of the DPOPipeline controller, on plain dicts (like kube.py, which it builds on).

A pipeline reads and patches its own status, and lists, creates and patches (runPolicy.suspend)
the DPOJobs it owns. 404 means absent and 409 on create means "exists" (a second operator or a
retried create won the race), never an error.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes.client.exceptions import ApiException

from .api import GROUP, PLURAL, VERSION
from .kube import Kube
from .pipeline_api import PIPELINE_PLURAL


class PipelineKube:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.custom = kube.custom

    def get_pipeline(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            resp: Any = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PIPELINE_PLURAL, name,
                                                                 _preload_content=False)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return dict(json.loads(resp.data))

    def patch_pipeline_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PIPELINE_PLURAL, name, {"status": status})

    def list_dpojobs(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """DPOJobs matching a selector (callers re-check labels and owner: not every server filters)."""
        resp: Any = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                         label_selector=label_selector, _preload_content=False)
        return list(json.loads(resp.data).get("items") or [])

    def get_dpojob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.kube.get_dpojob(namespace, name)

    def create_dpojob(self, obj: dict[str, Any]) -> bool:
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, obj["metadata"]["namespace"], PLURAL, obj,
                                                        _preload_content=False)
            return True
        except ApiException as err:
            if err.status == 409:
                return False
            raise

    def patch_dpojob(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        try:
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch,
                                                       _preload_content=False)
        except ApiException as err:
            if err.status != 404:
                raise
