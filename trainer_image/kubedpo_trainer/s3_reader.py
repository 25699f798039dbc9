"""A seekable, resumable reader over one S3 object.

Why a reader of our own: botocore retries a request until its headers arrive, but a body
that breaks mid-stream (connection reset, IncompleteRead, read timeout) surfaces on
`.read()` as an exception and is never retried. A data shard streamed for an hour must
survive that, so this reader reopens the object with a ranged GET `bytes=<offset>-` at the
exact byte where the broken body stopped and goes on; callers see one unbroken stream.

Resumed GETs carry `If-Match: <ETag of the first response>`: if the object was replaced
meanwhile, the store answers 412 and we raise instead of splicing two versions together.

Seeking closes the current body and the next read opens a new ranged GET at the new
offset. That is all pyarrow's ParquetFile needs (footer at the end, then column chunks),
and it keeps one credential, endpoint, retry and error path for every format, which
`pyarrow.fs.S3FileSystem` would duplicate with its own settings and own retries.

The resume policy is tenacity's (bounded attempts, exponential backoff with jitter); each
resume counts as a retry in `kubedpo_s3_retries_total`. The attempt budget is per read
call: a body that breaks again and again but delivers bytes each time keeps going (the
object is finite), one that delivers nothing fails with StorageError after `attempts`.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from http.client import IncompleteRead
from typing import Any

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from urllib3.exceptions import ProtocolError
from urllib3.exceptions import ReadTimeoutError as URLLib3ReadTimeout

from .errors import InputError, StorageError
from .s3_errors import translate_errors

# Errors of a body that broke after its headers arrived: resume from the current offset.
BROKEN_STREAM = (
    ResponseStreamingError, IncompleteReadError, IncompleteRead, ReadTimeoutError, URLLib3ReadTimeout,
    ProtocolError, ConnectionClosedError, EndpointConnectionError, ConnectionError, TimeoutError,
)
SKIP_LIMIT = 256 * 1024  # forward seeks shorter than this read through instead of a new GET


class Traffic:
    """GET requests opened and body bytes received by the readers of one client.

    The data plane's cost (bytes per rank per epoch, requests per step) is measured here, at
    the last point before the network, so the benchmark reports what the store sent.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gets = 0
        self.bytes = 0

    def add(self, gets: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.gets += gets
            self.bytes += nbytes


class _Broken(Exception):
    """A broken body, wrapped so tenacity retries exactly these and nothing else."""


class S3RangeReader(io.RawIOBase):
    """Raw, seekable stream of s3://bucket/key from byte `start`; wrap in io.BufferedReader."""

    def __init__(self, client: Any, bucket: str, key: str, start: int = 0, *, end: int | None = None,
                 etag: str | None = None, traffic: Traffic | None = None, attempts: int = 8, on_retry: Callable[[], None] = lambda: None,
                 wait_initial: float = 0.2, wait_max: float = 10.0,
                 translate: Callable[[str], AbstractContextManager[None]] = translate_errors) -> None:
        super().__init__()
        self._client, self.bucket, self.key = client, bucket, key
        self.uri = f"s3://{bucket}/{key}"
        self._pos = start
        self._body: Any = None
        self._etag: str | None = etag
        self._end = end  # exclusive; None: to the end of the object
        self._traffic = traffic or Traffic()
        self.size: int | None = None
        self._eof = False
        self._on_retry, self._translate = on_retry, translate
        self._retrying = Retrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential_jitter(initial=wait_initial, max=wait_max, jitter=wait_initial),
            retry=retry_if_exception_type(_Broken),
            before_sleep=lambda _state: self._on_retry(),
            reraise=True,
        )
        self.resumes = 0

    # --- io.RawIOBase --------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._pos
        elif whence == os.SEEK_END:
            offset += self._size()
        if offset < 0:
            raise ValueError(f"{self.uri}: negative seek position {offset}")
        if offset != self._pos:
            if self._body is not None and 0 < offset - self._pos <= SKIP_LIMIT:
                self._skip(offset - self._pos)
            else:
                self._close_body()
                self._pos, self._eof = offset, False
        return self._pos

    def readinto(self, buffer: Any) -> int:
        if self._eof or len(buffer) == 0:
            return 0
        want = len(buffer) if self._end is None else min(len(buffer), self._end - self._pos)
        if want <= 0:
            self._eof = True
            return 0
        try:
            data = self._retrying(self._read_chunk, want)
        except _Broken as e:
            raise StorageError(
                f"{self.uri}: body kept breaking at byte {self._pos} after {self.resumes} resumes: "
                f"{type(e.__cause__).__name__}"
            ) from e.__cause__
        n = len(data)
        self._traffic.add(nbytes=n)
        buffer[:n] = data
        self._pos += n
        if n == 0:
            self._eof = True
        return n

    def close(self) -> None:
        self._close_body()
        super().close()

    # --- internals -----------------------------------------------------------------------

    def _read_chunk(self, n: int) -> bytes:
        try:
            if self._body is None:
                if not self._open():
                    return b""
            return self._body.read(n)
        except BROKEN_STREAM as e:
            self._close_body()
            self.resumes += 1
            raise _Broken() from e

    def _open(self) -> bool:
        """GET from the current offset; False when the offset is at or past the end."""
        if (self.size is not None and self._pos >= self.size) or (self._end is not None and self._pos >= self._end):
            return False
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self._end is not None:  # a bounded range: the store sends these bytes and no more
            kwargs["Range"] = f"bytes={self._pos}-{self._end - 1}"
        elif self._pos > 0:
            kwargs["Range"] = f"bytes={self._pos}-"
        if self._etag:
            kwargs["IfMatch"] = self._etag
        try:
            with self._translate(self.uri):
                self._traffic.add(gets=1)
                resp = self._client.get_object(**kwargs)
        except InputError as e:
            if isinstance(e.__cause__, ClientError):
                code = e.__cause__.response.get("Error", {}).get("Code")
                if code == "InvalidRange":  # start at or past the end: an empty stream
                    return False
                if code == "PreconditionFailed":
                    raise InputError(
                        f"{self.uri}: object was replaced while being read (ETag {self._etag} no longer "
                        f"matches at byte {self._pos}); refusing to mix two versions"
                    ) from None
            raise
        self._etag = self._etag or resp.get("ETag")
        self.size = _total_size(resp, self._pos)
        self._body = resp["Body"]
        return True

    def _size(self) -> int:
        if self.size is None:
            with self._translate(self.uri):
                head = self._client.head_object(Bucket=self.bucket, Key=self.key)
            self.size = int(head["ContentLength"])
            self._etag = self._etag or head.get("ETag")
        return self.size

    def _skip(self, n: int) -> None:
        while n > 0:
            got = self.read(min(n, 64 * 1024))
            if not got:
                break
            n -= len(got)

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # closing a broken connection may itself fail; it is gone anyway
                pass
            self._body = None


def _total_size(resp: dict[str, Any], start: int) -> int:
    """Object size from `Content-Range: bytes a-b/total`, else start + Content-Length."""
    rng = resp.get("ContentRange")
    if rng and "/" in rng and not rng.endswith("/*"):
        return int(rng.rsplit("/", 1)[1])
    return start + int(resp.get("ContentLength", 0))
