"""Exceptions that carry their exit code, so the operator's podFailurePolicy can act on them.

Exit codes of `kubedpo-trainer` (the contract with the operator):

| code | meaning | operator |
|---|---|---|
| 0  | training finished, output written | Succeeded |
| 1  | anything unexpected (crash, S3 unreachable after retries, NCCL error) | gang restart, counts against `maxRestarts` |
| 2  | configuration or input error (bad field, bad data row, missing bucket, wrong credentials) | Failed at once, never retried |
| 75 | preempted (SIGTERM): a checkpoint was written before exit if one could be within `preemptionGraceSeconds` (before the first step, or with a read stalled, the restart resumes from the last complete one) (EX_TEMPFAIL) | gang restart, NOT counted |
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK = 0
EXIT_RETRIABLE = 1
EXIT_CONFIG = 2
EXIT_PREEMPTED = 75


def combine_exit_codes(codes: Sequence[int]) -> int:
    """One code for the pod: config errors win (never retry), then crashes, then preemption."""
    if all(c == EXIT_OK for c in codes):
        return EXIT_OK
    if EXIT_CONFIG in codes:
        return EXIT_CONFIG
    failures = [c for c in codes if c not in (EXIT_OK, EXIT_PREEMPTED)]
    if failures:
        return EXIT_RETRIABLE
    return EXIT_PREEMPTED


class KubeDPOError(Exception):
    """Base class: every error the trainer raises on purpose knows its exit code."""

    exit_code: int = EXIT_RETRIABLE


class ConfigError(KubeDPOError):
    """The configuration is invalid; message names the field path. Never retried."""

    exit_code = EXIT_CONFIG


class InputError(KubeDPOError):
    """Input data or a URI is unusable (bad row, empty prefix, no such bucket). Never retried."""

    exit_code = EXIT_CONFIG


class StorageError(KubeDPOError):
    """Storage failed after retries (network, 5xx). Retried by a gang restart."""

    exit_code = EXIT_RETRIABLE


class Preempted(KubeDPOError):
    """SIGTERM arrived (a checkpoint was written if the loop was running); the restart is free."""

    exit_code = EXIT_PREEMPTED
