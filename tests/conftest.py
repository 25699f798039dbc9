"""Session-wide fixtures shared by every test folder.

`tiny` builds the local tokenizer, 2-layer Llama and preference task once per test session
(about 2 s), so every test that needs a real model loads the same files through the same
code path a user's model takes.
"""

from __future__ import annotations

import pytest

from kubedpo_trainer.tiny import TinyArtifacts, build_all

pytest_plugins = ["tests.support.s3", "tests.support.judge_server"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifacts:
    """Tiny model folder plus train/eval JSONL shard folders (standard format)."""
    return build_all(tmp_path_factory.mktemp("tiny"), n_train=2048, n_eval=256)


# Fixtures that start an external part, and the marker a test using them (directly or through
# another fixture) gets: `-m "not s3"` then deselects every test that would start SeaweedFS.
FIXTURE_MARKERS = {
    "seaweedfs": "s3",
    "kmock": "kube",
    "helm": "helm",
    "prometheus_bin": "prometheus",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in used:
                item.add_marker(marker)
