"""One-shot commands (the CLI, migrations, a server expected to refuse to start): run to the end
under a timeout, never left behind."""

from __future__ import annotations

import os
import signal
import subprocess

from bench.harness.environment import ROOT


def run_command(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command from the repo root in its own process group, stdout and stderr together;
    on timeout kill the whole group and raise with what it printed."""
    process = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=10)
        raise TimeoutError(f"{' '.join(map(str, args))} did not finish within {timeout}s:\n{output[-3000:]}") from None
    return subprocess.CompletedProcess(args, process.returncode, output, None)
