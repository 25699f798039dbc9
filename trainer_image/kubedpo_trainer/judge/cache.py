"""Judgements cached in S3 (or a local folder) so a restart or a re-run never pays twice.

Layout: `<cacheUri>/<fingerprint[:16]>/seg-<run>-r<rank>-<n>.jsonl`, one JSON line per judgement
`{"k": key, "v": value}`, where key = sha256(fingerprint + the exact request content) and the
fingerprint hashes what makes an answer reusable (judge kind, URL, model, template, system
prompt, mode, temperature, max tokens; or the reward model's URI and file versions). A
different judge config therefore reads a different folder and never sees foreign answers.

Persistence is incremental: new judgements are buffered and written as a new segment object
(one PUT, whole or not at all) every `flush_every` judgements, at the end of every unit of
work, on failure and on SIGTERM. A SIGKILLed rank loses at most its last `flush_every - 1`
unflushed judgements plus the `concurrency` requests then in flight: that is what a restart
pays again. At the end of a task each rank merges its own segments of the run into one
(`compact`), so the number of objects grows with runs x ranks, not with judgements.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from typing import Any

from .. import storage
from ..errors import InputError

log = logging.getLogger(__name__)

FLUSH_EVERY = 16


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def request_key(fp: str, content: Any) -> str:
    body = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{fp}\n{body}".encode()).hexdigest()


class JudgementCache:
    def __init__(self, root_uri: str, fp: str, rank: int = 0, flush_every: int = FLUSH_EVERY) -> None:
        self.prefix = storage.join(root_uri, fp[:16]) + "/"
        self.fp = fp
        self.rank = rank
        self.flush_every = flush_every
        # Unique per process even where pods share PIDs and start in the same second (shared cacheUri)
        self.run = f"{int(time.time())}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._entries: dict[str, Any] = {}
        self._pending: dict[str, Any] = {}
        self._written: list[str] = []  # this run's segments, merged by compact()
        self._mine: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def load(self) -> int:
        """Read every segment under this fingerprint; returns the judgements found."""
        try:
            objects = storage.list_objects(self.prefix, suffixes=(".jsonl",))
        except InputError:
            return 0  # nothing cached yet
        for obj in objects:
            for n, line in enumerate(storage.read_bytes(obj.uri).decode().splitlines(), 1):
                try:
                    entry = json.loads(line)
                    self._entries[entry["k"]] = entry["v"]
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: not a cache entry, ignored (that judgement is paid again)", obj.uri, n)
        log.info("judge cache %s: %d judgements in %d segments", self.prefix, len(self._entries), len(objects))
        return len(self._entries)

    def get(self, key: str) -> Any | None:
        return self._entries.get(key)

    def put(self, key: str, value: Any) -> None:
        self._entries[key] = value
        self._pending[key] = value
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        uri = f"{self.prefix}seg-{self.run}-r{self.rank}-{len(self._written):06d}.jsonl"
        storage.write_bytes(uri, _lines(self._pending))
        self._written.append(uri)
        self._mine.update(self._pending)
        self._pending = {}

    def compact(self) -> None:
        """Merge this run's segments into one object (written before the parts are deleted)."""
        self.flush()
        if len(self._written) < 2:
            return
        merged = f"{self.prefix}seg-{self.run}-r{self.rank}-all.jsonl"
        storage.write_bytes(merged, _lines(self._mine))
        for uri in self._written:
            storage.delete(uri)
        self._written = [merged]


def _lines(entries: dict[str, Any]) -> bytes:
    return "".join(json.dumps({"k": k, "v": v}, separators=(",", ":")) + "\n" for k, v in entries.items()).encode()
