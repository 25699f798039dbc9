"""botocore exceptions → the trainer's exit-code-carrying errors, with the URI and no secrets.

The split matters to the operator: InputError (exit 2) fails the DPOJob at once (a missing
bucket or a wrong key does not heal by restarting 8 GPUs), StorageError (exit 1) is a gang
restart (the endpoint was down, 5xx after all retries). Messages name the s3:// URI and the
cause; any secret that could have leaked into a server message is masked.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from .errors import InputError, StorageError

_CREDS_HINT = "check the S3 credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile or IRSA) and s3.endpointUrl"
_HINTS = {
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchKey": "no such object",
    "404": "no such object",
    "NotFound": "no such object",
    "AccessDenied": "access denied: " + _CREDS_HINT + ", and the bucket policy",
    "403": "access denied: " + _CREDS_HINT,
    "InvalidAccessKeyId": "the access key is not known to the store: " + _CREDS_HINT,
    "SignatureDoesNotMatch": "the secret key does not match the access key: " + _CREDS_HINT,
}
# 4xx codes that a restart cannot fix are input errors; these 4xx are transient.
_TRANSIENT_4XX = {"RequestTimeout", "RequestTimeTooSkewed", "ExpiredToken", "TokenRefreshRequired", "SlowDown"}
_ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every known secret (given, or from the environment) replaced by ***."""
    for s in [*secrets, *(os.environ.get(k, "") for k in _ENV_SECRETS)]:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text


def classify(uri: str, exc: BaseException, secrets: Iterable[str] = ()) -> InputError | StorageError:
    """The error to raise for `exc` raised while working on `uri`."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        op = exc.operation_name
        detail = _HINTS.get(code) or str(err.get("Message") or "").strip() or f"HTTP {status}"
        msg = scrub(f"{uri}: {code} ({op}): {detail}", secrets)
        if status >= 500 or code in _TRANSIENT_4XX:
            return StorageError(msg + " (after retries)")
        return InputError(msg)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return InputError(f"{uri}: no usable S3 credentials found: {_CREDS_HINT}")
    if isinstance(exc, ParamValidationError):
        return InputError(scrub(f"{uri}: invalid S3 request: {exc}", secrets))
    if isinstance(exc, BotoCoreError):
        return StorageError(scrub(f"{uri}: S3 unreachable or failing after retries: {exc}", secrets))
    return StorageError(scrub(f"{uri}: S3 I/O failed: {type(exc).__name__}: {exc}", secrets))


@contextmanager
def translate_errors(uri: str, secrets: Iterable[str] = ()) -> Iterator[None]:
    """Re-raise botocore/network errors inside the block as InputError or StorageError."""
    try:
        yield
    except (BotoCoreError, ClientError, OSError) as e:
        raise classify(uri, e, secrets) from e
