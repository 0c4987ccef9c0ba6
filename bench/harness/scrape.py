"""What a Prometheus text endpoint reports: its samples as (name, labels, value), and the few
questions the tests and benchmarks ask of them."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text endpoint, as (name, labels, value)."""
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    return [
        (s.name, s.labels, s.value) for family in text_string_to_metric_families(response.text) for s in family.samples
    ]


def metric(samples, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    return sum(value for n, have, value in samples if n == name and all(have.get(k) == v for k, v in labels.items()))


def has_metric(samples, name: str) -> bool:
    return any(n == name for n, _, _ in samples)


def reported_worker_pids(samples) -> set[int]:
    """The pids of the live workers as the master reports them in `samples` (one
    `process_start_time_seconds` series each), not as the operating system sees the process tree."""
    return {
        int(have["pid"]) for n, have, _ in samples if n == "process_start_time_seconds" and have.get("role") == "worker"
    }
