"""The base of every spec model (DPOJob, DPOPipeline, the trainer's config): one wire style."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class Schema(BaseModel):
    """Base of every spec model: camelCase aliases, unknown fields are errors, numbers finite.

    allow_inf_nan=False: Kubernetes' JSON has no Infinity/NaN (the API server refuses them), and an
    infinite duration or rate is always a mistake, whether written `.inf` in YAML or "inf".
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        allow_inf_nan=False,
        use_enum_values=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """camelCase JSON-able dict without unset optionals, as it appears in a manifest."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
