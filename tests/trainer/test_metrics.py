"""The /metrics endpoint serves every documented name with the values that were logged."""

from __future__ import annotations

import urllib.request

import torch
from prometheus_client.parser import text_string_to_metric_families

from kubedpo_trainer.gpu_memory import cuda_memory_reader, max_over_ranks
from kubedpo_trainer.metrics import COUNTERS, HISTOGRAMS, LAZY_GAUGES, TRAIN_GAUGES, TrainerMetrics


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("dpojob") == "j1":
                out[s.name] = s.value
                assert s.labels == {**s.labels, "dpojob": "j1", "namespace": "ns", "rank": "0"}
                assert "job" not in s.labels  # Prometheus's own label: see metrics.LABELS
    return out


def test_endpoint_serves_every_name_with_logged_values() -> None:
    m = TrainerMetrics(job="j1", namespace="ns", rank=0)
    logged = {name: float(i) + 0.5 for i, name in enumerate(TRAIN_GAUGES)}
    m.set({**logged, "not_a_metric": 3.0})
    m.inc("samples", 8)
    m.sync_counter("bad_records", 3)
    m.sync_counter("bad_records", 5)  # a running total: the counter follows it, never double counts
    m.observe("step_seconds", 0.3)
    port = m.serve(0, addr="127.0.0.1")
    got = _scrape(port)
    for name, value in logged.items():
        assert got[f"kubedpo_{name}"] == value, name
    for name in COUNTERS:
        assert f"kubedpo_{name}_total" in got
    for name in HISTOGRAMS:
        assert f"kubedpo_{name}_count" in got
    assert got["kubedpo_samples_total"] == 8
    assert got["kubedpo_bad_records_total"] == 5
    assert got["kubedpo_step_seconds_count"] == 1 and got["kubedpo_step_seconds_sum"] == 0.3
    assert "kubedpo_not_a_metric" not in got


def test_eval_and_checkpoint_gauges_do_not_exist_until_set() -> None:
    """Before the first evaluation an eval accuracy of 0 would be a lie: no series at all instead."""
    m = TrainerMetrics(job="j1", namespace="ns", rank=0)
    port = m.serve(0, addr="127.0.0.1")
    m.set({"step": 3, "loss": 0.6})
    got = _scrape(port)
    assert got["kubedpo_step"] == 3 and got["kubedpo_loss"] == 0.6
    assert {"kubedpo_eval_rewards_accuracies", "kubedpo_last_checkpoint_step"} <= {f"kubedpo_{n}" for n in LAZY_GAUGES}
    assert not [n for n in got if n.removeprefix("kubedpo_") in LAZY_GAUGES]
    m.set({"eval_rewards_accuracies": 0.0, "last_checkpoint_step": 50})
    got = _scrape(port)
    assert got["kubedpo_eval_rewards_accuracies"] == 0.0 and got["kubedpo_last_checkpoint_step"] == 50
    assert "kubedpo_eval_loss" not in got  # only what was set
    assert "kubedpo_gpu_memory_bytes" not in got  # GPU only: no series on a CPU run


def test_gpu_memory_is_the_fullest_rank_allocated_and_reserved() -> None:
    """`kubedpo_gpu_memory_bytes` used to be declared and never set. No GPU here: the CUDA reader
    is replaced by one per simulated rank, and the gather by what a 2-rank all-gather returns;
    everything from the readings to the served gauge is the trainer's code."""
    readings = {0: (3.0e9, 4.0e9), 1: (5.0e9, 4.5e9)}  # rank 1 peaks higher in both
    gathered = torch.tensor([*readings[0], *readings[1]], dtype=torch.float64)
    m = TrainerMetrics(job="j1", namespace="ns", rank=0)
    m.set_gpu_memory(max_over_ranks(lambda: readings[0], lambda local: gathered))
    port = m.serve(0, addr="127.0.0.1")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    got = {s.labels["kind"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
           if s.name == "kubedpo_gpu_memory_bytes"}
    assert got == {"allocated": 5.0e9, "reserved": 4.5e9}


def test_no_gpu_memory_reader_without_cuda() -> None:
    assert cuda_memory_reader("cpu") is None
