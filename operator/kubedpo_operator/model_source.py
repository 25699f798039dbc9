"""Read a model's config.json from its URI for the memory plan, without torch or transformers.

local folder, file:// or s3:// (boto3, the job's s3.endpointUrl/region); the hub only through an
explicit hf://org/name (huggingface_hub, when installed). A bare org/name is refused here: it is
ambiguous with a relative path, and the plan must not guess which one the trainer will see.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ModelConfigUnavailable(Exception):
    """config.json could not be read; the message names the URI and why."""


def read_config_json(uri: str, endpoint_url: str | None = None, region: str | None = None,
                     timeout_s: float = 10.0) -> dict[str, Any]:
    try:
        if uri.startswith("s3://"):
            text = _read_s3(uri, endpoint_url, region, timeout_s)
        elif uri.startswith("hf://"):
            text = _read_hub(uri.removeprefix("hf://").strip("/"))
        else:
            path = Path(uri.removeprefix("file://")) / "config.json"
            if not path.exists():
                raise ModelConfigUnavailable(f"{path}: no such file (the hub needs an explicit hf://org/name)")
            text = path.read_text()
        data = json.loads(text)
    except ModelConfigUnavailable:
        raise
    except json.JSONDecodeError as err:
        raise ModelConfigUnavailable(f"{uri.rstrip('/')}/config.json: not JSON: {err}") from None
    except Exception as err:  # network, credentials, missing object: the plan is advisory
        raise ModelConfigUnavailable(f"{uri.rstrip('/')}/config.json: cannot read: {err}") from None
    if not isinstance(data, dict):
        raise ModelConfigUnavailable(f"{uri.rstrip('/')}/config.json: expected an object")
    return data.get("text_config", data) if "hidden_size" not in data else data


def _read_s3(uri: str, endpoint_url: str | None, region: str | None, timeout_s: float) -> str:
    import boto3
    from botocore.config import Config

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    key = (key.rstrip("/") + "/config.json").lstrip("/")
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region,
                          config=Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                                        retries={"max_attempts": 2, "mode": "standard"}))
    return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def _read_hub(repo: str) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ModelConfigUnavailable(f"hf://{repo}: huggingface_hub is not installed here") from None
    return Path(hf_hub_download(repo, "config.json")).read_text()
