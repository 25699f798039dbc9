"""What a URI field of the schema may hold, checked once for the CRD, `kubedpo validate` and the trainer.

Three forms, and nothing else:

| form | example | where |
|---|---|---|
| S3 | `s3://bucket/prefix/` | every URI field |
| local path | `/data/prefs/`, `runs/x`, `file:///data/prefs/` | every URI field |
| hub id | `hf://org/name` (or `hf://name`) | model fields only (`ModelUri`) |

Why so strict: a URI that is almost right is worse than one that is plainly wrong. `s3:/bucket/x`
and `s3//bucket/x` are legal relative paths, so before this check the trainer wrote checkpoints
into a local folder named `s3:` and reported success; `s3a://` (Hadoop's name) and `gs://` would
go the same way. So anything that starts like a scheme (`word:`) must be one we speak, a known
scheme name followed by `//` is a missing colon, and S3 bucket names follow S3's own rules
(3-63 characters of lower-case letters, digits, `.` and `-`; the legacy upper-case names of old
us-east-1 buckets are refused too: no S3-compatible store accepts them). A local path whose
first part contains a colon can be written `./name:x/...`.

Only `hf://` reaches the Hugging Face hub: a bare `org/name` is a local path like any other, so
a mistyped `models/nope` fails at once naming the folder it tried instead of asking the hub.

`StorageUri` and `ModelUri` carry the same rule as CEL (`x-kubernetes-validations`), which the
CRD generator keeps, so `kubectl apply` refuses these URIs too. Pure: pydantic and re only.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, StringConstraints, WithJsonSchema

MAX_URI = 4096  # also bounds the CEL rules' cost estimate (an unbounded string is costed at 3 MB)
FORMS = "s3://bucket/prefix or a local path (file:///path works too)"
MODEL_FORMS = "s3://bucket/prefix, a local path, or hf://org/name (a Hugging Face hub model)"

_SCHEME = re.compile(r"^([A-Za-z][-A-Za-z0-9+.]*):")
# Never quoted back: a URI is copied to the ConfigMap, logs and status (spec_rules says the same for
# the operator's non-URI fields such as s3.endpointUrl).
_CREDENTIALS = re.compile(r"^[A-Za-z][-A-Za-z0-9+.]*://[^/?#]*@")
_SIGNED_QUERY = re.compile(r"[?&](X-Amz-Credential|X-Amz-Signature|AWSAccessKeyId|Signature|sig)=", re.I)
# A scheme we know, written without its colon: `s3//bucket/x` is a relative path otherwise.
_KNOWN = ("s3", "s3a", "s3n", "gs", "gcs", "hf", "file", "http", "https", "az", "abfs", "abfss", "wasb", "wasbs")
_NO_COLON = re.compile(rf"^({'|'.join(_KNOWN)})//", re.I)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_HUB_PART = r"[A-Za-z0-9][-_.A-Za-z0-9]*"
_HUB = re.compile(rf"^hf://{_HUB_PART}(/{_HUB_PART})?/?$")
_HINTS = {
    "s3a": "s3a:// and s3n:// are Hadoop's names for S3: write s3://bucket/prefix",
    "s3n": "s3a:// and s3n:// are Hadoop's names for S3: write s3://bucket/prefix",
    "gs": "Google Cloud Storage is reached through its S3-compatible endpoint: set s3.endpointUrl and "
          "write s3://bucket/prefix",
    "gcs": "Google Cloud Storage is reached through its S3-compatible endpoint: set s3.endpointUrl and "
           "write s3://bucket/prefix",
}


def bucket_problem(bucket: str) -> str | None:
    """Why S3 would refuse `bucket` as a name (its bucket naming rules), or None."""
    if not bucket:
        return "no bucket: expected s3://bucket/prefix"
    if not _BUCKET.match(bucket) or ".." in bucket or ".-" in bucket or "-." in bucket or _IP.match(bucket):
        return (f"bucket {bucket!r} is not a valid S3 bucket name (3-63 characters: lower-case letters, digits, "
                "'.' and '-', starting and ending with a letter or digit, not an IP address)")
    return None


def uri_problem(value: str, hub: bool = False) -> str | None:
    """Why `value` is not a URI this field accepts, or None. `hub`: the field names a model.

    Messages quote the value (they reach status, events and logs), except when it holds credentials.
    """
    forms = MODEL_FORMS if hub else FORMS
    if _CREDENTIALS.match(value) or _SIGNED_QUERY.search(value):
        return ("must not embed credentials (user:password@ or a signed query): put them in a Secret and "
                "reference it with envFrom (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    if not value or value != value.strip():
        return f"{value!r}: empty, or spaces around it"
    m = _SCHEME.match(value)
    if m is None:
        if _NO_COLON.match(value):
            scheme = value.split("/", 1)[0]
            return f"{value!r} is missing the ':' after {scheme!r} (it would be a local folder named {scheme!r}): " \
                   f"write {scheme.lower()}://..."
        return None  # a local path
    scheme = m.group(1).lower()
    if scheme == "s3":
        if not value.startswith("s3://"):
            return f"{value!r} is not an S3 URI (it would be a local folder named {m.group(0)!r}): " \
                   "write s3://bucket/prefix (lower-case s3)"
        bucket = value[len("s3://"):].split("/", 1)[0]
        problem = bucket_problem(bucket)
        return f"{value!r}: {problem}" if problem else None
    if scheme == "file":
        if not value.startswith("file://") or len(value) == len("file://"):
            return f"{value!r}: write file:///absolute/path, or the path alone"
        return None
    if scheme == "hf":
        if not hub:
            return f"{value!r}: hf:// names a hub model; only model fields take it (use {forms})"
        if not _HUB.match(value):  # also refuses HF:// (from_pretrained would take it as a path)
            return f"{value!r}: expected hf://org/name (a Hugging Face hub model id)"
        return None
    hint = _HINTS.get(scheme, f"use {forms}")
    return f"{value!r}: unsupported scheme {scheme + ':'!r}: {hint}"


def _check(value: str, hub: bool) -> str:
    problem = uri_problem(value, hub)
    if problem:
        raise ValueError(problem)
    return value


def check_storage_uri(value: str) -> str:
    return _check(value, hub=False)


def check_model_uri(value: str) -> str:
    return _check(value, hub=True)


def is_hub(uri: str) -> bool:
    return uri.startswith("hf://")


def hub_id(uri: str) -> str:
    """`hf://org/name/` → `org/name`."""
    return uri.removeprefix("hf://").strip("/")


# --- the same rules as CEL, for the CRD (RE2 syntax; the API server prefixes the field path) ------

_CEL_LOCAL = ("(!self.matches('^[A-Za-z][-A-Za-z0-9+.]*:') && "
              f"!self.matches('^(?i)({'|'.join(_KNOWN)})//'))")
_CEL_S3 = (r"(self.matches('^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$') && "
           r"!self.matches('^s3://[^/]*(\\.\\.|\\.-|-\\.)') && "
           r"!self.matches('^s3://[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+(/.*)?$'))")
_CEL_FILE = "self.matches('^file://.+')"
_CEL_HUB = rf"self.matches('^hf://{_HUB_PART}(/{_HUB_PART})?/?$')"
_CEL_SPACES = r"!self.matches('^\\s|\\s$')"


CEL_NO_CREDENTIALS = {
    "rule": "!self.matches('^[A-Za-z][-A-Za-z0-9+.]*://[^/?#]*@')",
    "message": "no credentials in URIs; put them in a Secret and use envFrom",
}


def _cel(hub: bool) -> list[dict[str, str]]:
    forms = [_CEL_S3, _CEL_FILE, _CEL_LOCAL] + ([_CEL_HUB] if hub else [])
    return [CEL_NO_CREDENTIALS, {
        # A URI with credentials breaks the rule above; one message is enough.
        "rule": f"{CEL_NO_CREDENTIALS['rule'].removeprefix('!')} || ({_CEL_SPACES} && ({' || '.join(forms)}))",
        "message": f"must be {MODEL_FORMS if hub else FORMS}; S3 bucket names are 3-63 lower-case letters, "
                   "digits, '.' or '-'",
    }]


def _schema(hub: bool) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "minLength": 1, "maxLength": MAX_URI,
                           "x-kubernetes-validations": _cel(hub)})


StorageUri = Annotated[str, StringConstraints(min_length=1, max_length=MAX_URI),
                       AfterValidator(check_storage_uri), _schema(hub=False)]
"""Data, checkpoint, output and cache locations: s3:// or a local path."""

ModelUri = Annotated[str, StringConstraints(min_length=1, max_length=MAX_URI),
                     AfterValidator(check_model_uri), _schema(hub=True)]
"""A model or tokenizer folder: s3://, a local path, or hf://org/name."""

StorageUriItem = Annotated[str, StringConstraints(min_length=1, max_length=MAX_URI), AfterValidator(check_storage_uri)]
"""A StorageUri inside a list or map: no CEL there (its cost estimate would multiply by the unbounded count)."""
