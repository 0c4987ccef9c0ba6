"""Waiting on real processes without fixed sleeps: poll until a condition holds, under a deadline
generous enough for a loaded machine (a poll returns as soon as the condition holds, so the
deadline costs nothing when things work)."""

from __future__ import annotations

import subprocess
import time

import requests


def wait_for(predicate, what: str, timeout: float = 60, interval: float = 0.05):
    """Call `predicate()` until it returns something truthy, and return that; after `timeout`
    seconds raise AssertionError naming `what`. Exceptions from `predicate` propagate (to fail
    at once, e.g. when the process waited on has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_ready(process: subprocess.Popen, url: str, *, timeout: float, name: str) -> requests.Response:
    """Until `url` answers 200, that answer returned; RuntimeError at once if the process exits,
    or after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        try:
            response = requests.get(url, timeout=5)
            if response.status_code == 200:
                return response
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not answer {url} within {timeout}s")
