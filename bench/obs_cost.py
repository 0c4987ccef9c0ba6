"""What each part of the observability costs a request, in CPU time: one process per variant,
all up at once on one real Postgres, loaded in turn in interleaved rounds (the order rotating,
so the box's drift lands on every variant alike), the CPU they spent divided by the requests they
served. CPU time, not throughput: another tenant's load slows a round down far more than it
changes what a request costs in CPU.

    python -m bench.obs_cost [--mode inprocess|gunicorn] [--kind list|create] [--rounds 9] [--variants ...]

Two modes, for two questions:
- `inprocess` (the default, ~1 minute): each variant is a Python process that builds the app
  as a gunicorn worker does (the multiprocess sample files opened after the app is built) and
  runs requests through it by WSGI, each handed to a thread pool as gthread hands it (which is
  where sentry-sdk's thread integration hooks in), one at a time; the figure is the process's
  CPU over a fixed number of requests. No sockets, no wrk, no GIL contention: the spread of a
  round is a few percent, so a lever of 5 us shows. What is measured is the service's own work.
- `gunicorn` (~1.5 minutes): one real gthread worker (4 threads) per variant under wrk, the
  worker's CPU (user + system, psutil) over the requests wrk completed. The truth of what the
  shipped worker pays, GIL hand-offs and all (about twice the in-process figures), but on a
  shared box its rounds spread by +-20 %: use it to confirm, not to tell 10 us apart.

Each part is on, or is off, process-wide (the logging configuration, the Sentry client,
prometheus_client's value class chosen before import): hence a process per variant.

Variants (production settings with these changes):
    off           no access line (LOG_LEVEL=WARNING), no file, no console, no metrics, no Sentry
    file          + the JSON access line to the log file
    console       + the JSON access line on stderr only
    file+console  + both (the line is formatted once and written twice)
    metrics       + Prometheus metrics only
    file+sentry   + the file and Sentry (its logging hook sees every record; to a local receiver)
    all           every part on: file, console, metrics and Sentry
The cost of a part is read against the variant it adds to (stderr on top of file: file+console
- file), as the paired difference round by round. Without --db-uri a throwaway PostgreSQL 16
(pgserver) is started, seeded with 1,000 books and stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from bench.harness.environment import ROOT, stack_env
from bench.harness.gunicorn import Gunicorn
from bench.harness.polling import wait_for
from bench.harness.sentry_receiver import SentryReceiver
from bench.harness.throwaway_postgres import database
from bench.run import cli, login, seed, wrk

OFF = {"METRICS_ENABLED": "0", "LOG_TO_FILE": "0", "LOG_CONSOLE": "0", "LOG_LEVEL": "WARNING"}
LOGS = {"LOG_LEVEL": "INFO"}
RECEIVER = "<receiver>"  # replaced by the local Sentry receiver's DSN
VARIANTS: dict[str, dict[str, str]] = {
    "off": OFF,
    "file": {**OFF, **LOGS, "LOG_TO_FILE": "1"},
    "console": {**OFF, **LOGS, "LOG_CONSOLE": "1"},
    "file+console": {**OFF, **LOGS, "LOG_TO_FILE": "1", "LOG_CONSOLE": "1"},
    "metrics": {**OFF, "METRICS_ENABLED": "1"},
    "file+sentry": {**OFF, **LOGS, "LOG_TO_FILE": "1", "SENTRY_DSN": RECEIVER},
    "all": {**LOGS, "METRICS_ENABLED": "1", "LOG_TO_FILE": "1", "LOG_CONSOLE": "1", "SENTRY_DSN": RECEIVER},
}
# What each part adds, read against the variant it is added to.
PARTS = {
    "access line to file": ("file", "off"),
    "access line on stderr": ("console", "off"),
    "stderr on top of file": ("file+console", "file"),
    "metrics": ("metrics", "off"),
    "Sentry on top of file": ("file+sentry", "file"),
    "everything (the tax)": ("all", "off"),
}
BOOKS = 1000
CHILD = Path(__file__).resolve().parent / "obs_cost_child.py"
BASELINE = "@base"  # the suffix of a variant run from --baseline


def migrated_and_seeded(uri: str) -> None:
    cli(uri, "db", "upgrade")
    seed(uri, BOOKS)


def variant_env(settings: dict[str, str], uri: str, workdir: Path, dsn: str) -> dict[str, str]:
    """A variant's settings (VARIANTS' values) as a production environment, RECEIVER made `dsn`."""
    env = {key: dsn if value == RECEIVER else value for key, value in settings.items()}
    return stack_env(uri, workdir, **env)


# --- in-process ----------------------------------------------------------------------------
class InProcess:
    """One variant in a child process (bench/obs_cost_child.py) run from `tree`, driven over its
    stdin and stdout: a request count in, the CPU and wall seconds they took out. `wrapper` is a
    command the child runs under (valgrind, for bench/obs_instructions.py)."""

    def __init__(
        self, env: dict[str, str], workdir: Path, kind: str, tree: Path = ROOT, wrapper: tuple[str, ...] = ()
    ) -> None:
        metrics_dir = workdir / "metrics"
        metrics_dir.mkdir()
        self.log = workdir / "stderr.log"  # the console handler's stream, as journald's pipe
        with open(self.log, "wb") as stderr:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [*wrapper, sys.executable, str(CHILD), kind],
                cwd=tree,
                env={**os.environ, **env, "PYTHONPATH": str(tree), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )

    def ready(self) -> None:
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"variant did not start: {line!r}; see {self.log}")

    def run(self, requests: int, *, measured: bool = False) -> tuple[float, float]:
        """(CPU us a request, requests a second of wall time). `measured`: each request inside
        the function callgrind counts in (bench/obs_cost_child.py)."""
        self.process.stdin.write(f"{requests}{' measured' if measured else ''}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"variant exited; see {self.log}")
        cpu, wall = map(float, line.split())
        return cpu / requests * 1e6, requests / wall

    def stop(self, timeout: float = 30) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def measure_inprocess(args, uri: str, dsn: str, workdir: Path) -> dict[str, list[tuple[float, float]]]:
    trees = {"": ROOT} | ({BASELINE: args.baseline.resolve()} if args.baseline else {})
    variants: dict[str, InProcess] = {}
    try:
        for suffix, tree in trees.items():
            for name in args.variants:
                (workdir / (name + suffix)).mkdir()
                env = variant_env(VARIANTS[name], uri, workdir / (name + suffix), dsn)
                variants[name + suffix] = InProcess(env, workdir / (name + suffix), args.kind, tree)
        for variant in variants.values():
            variant.ready()
        return interleave({name: (lambda v=v: v.run(args.requests)) for name, v in variants.items()}, args.rounds)
    finally:
        for variant in variants.values():
            variant.stop()


# --- gunicorn ------------------------------------------------------------------------------
def worker_cpu(stack: Gunicorn) -> float:
    """CPU seconds (user + system, all threads) of the stack's workers so far."""
    total = 0.0
    for worker in psutil.Process(stack.pid).children():
        times = worker.cpu_times()
        total += times.user + times.system
    return total


def one_worker(stack: Gunicorn) -> bool:
    return len(psutil.Process(stack.pid).children()) == 1


def measure_gunicorn(args, uri: str, dsn: str, workdir: Path) -> dict[str, list[tuple[float, float]]]:
    with contextlib.ExitStack() as started:
        stacks: dict[str, Gunicorn] = {}
        for name in args.variants:
            (workdir / name).mkdir()
            env = variant_env(VARIANTS[name], uri, workdir / name, dsn)
            stacks[name] = started.enter_context(Gunicorn(env, workers=1, log_path=workdir / name / "gunicorn.out"))
            wait_for(lambda s=stacks[name]: one_worker(s), f"{name}: its worker")
        tokens = {name: login(stack.url) for name, stack in stacks.items()} if args.kind == "create" else {}
        runs = {}
        for name, stack in stacks.items():

            def run(name=name, stack=stack) -> tuple[float, float]:
                before = worker_cpu(stack)
                figures = wrk(
                    stack.url,
                    seconds=args.seconds,
                    workdir=workdir,
                    tag=name,
                    token=tokens.get(name),
                    connections=args.connections,
                )
                used = worker_cpu(stack) - before
                if figures["failures"] or not figures["requests"]:
                    raise RuntimeError(f"{name}: {figures['failures']} failures in {figures['requests']} requests")
                # Requests still in flight when wrk stops are neither counted nor (mostly) timed:
                # at most `connections` of a few thousand, alike for every variant.
                return used / figures["requests"] * 1e6, figures["rps"]

            runs[name] = run
        return interleave(runs, args.rounds)


# --- both ----------------------------------------------------------------------------------
def interleave(runs: dict, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """A warm-up run of each (discarded), then `rounds` rounds, each running every variant once,
    the order rotating by one each round."""
    for run in runs.values():
        run()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    order = list(runs)
    for _ in range(rounds):
        for name in order:
            results[name].append(runs[name]())
        order = order[1:] + order[:1]
    return results


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):>+8.1f} {min(values):>+6.0f}..{max(values):<+6.0f}"


def report(results: dict[str, list[tuple[float, float]]], title: str) -> dict:
    cpu = {name: [c for c, _ in rows] for name, rows in results.items()}
    rate = {name: [r for _, r in rows] for name, rows in results.items()}

    def paired(a: str, b: str) -> list[float]:
        return [x - y for x, y in zip(cpu[a], cpu[b], strict=True)]

    print(f"\n{title}")
    print(f"{'variant':<19} {'CPU us/request':>14} {'rounds':>13} {'req/s':>7}")
    for name, values in cpu.items():
        print(
            f"{name:<19} {statistics.median(values):>14.0f} {min(values):>6.0f}-{max(values):<6.0f}"
            f" {statistics.median(rate[name]):>7.0f}"
        )
    print(f"\n{'part':<29} {'adds us':>8} {'rounds':>14}   (the difference within each round)")
    parts = {}
    for suffix in ("", BASELINE):
        for part, (with_it, without) in PARTS.items():
            if with_it + suffix in cpu and without + suffix in cpu:
                added = paired(with_it + suffix, without + suffix)
                parts[part + suffix] = added
                print(f"{part + suffix:<29} {spread(added)}")
    if any(name.endswith(BASELINE) for name in cpu):
        print(f"\n{'this tree - baseline':<29} {'us':>8}")
        for name in cpu:
            if name + BASELINE in cpu:
                parts[f"{name}: this tree - baseline"] = paired(name, name + BASELINE)
                print(f"{name:<29} {spread(paired(name, name + BASELINE))}")
    if "all" in cpu and "off" in cpu:
        ratios = [off / on for on, off in zip(cpu["all"], cpu["off"], strict=True)]
        print(f"\nCPU off / all: {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})")
    return {"cpu_us": cpu, "rate": rate, "parts": parts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("inprocess", "gunicorn"), default="inprocess")
    parser.add_argument("--kind", choices=("list", "create"), default="list", help="GET /books/ or POST /books/")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=1000, help="inprocess: requests per variant and round")
    parser.add_argument("--seconds", type=float, default=2, help="gunicorn: wrk's run per variant and round")
    parser.add_argument("--connections", type=int, default=8, help="gunicorn: wrk's connections (2 a thread)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--db-uri", default=None, help="a migrated, seeded database (default: a throwaway server)")
    parser.add_argument("--baseline", type=Path, help="inprocess: also run every variant from this checkout")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.baseline and args.mode != "inprocess":
        parser.error("--baseline needs --mode inprocess")

    workdir = Path(tempfile.mkdtemp(prefix="obs-cost-"))
    try:
        with database(args.db_uri, "obs_cost", migrated_and_seeded) as uri, SentryReceiver() as receiver:
            measure = measure_inprocess if args.mode == "inprocess" else measure_gunicorn
            results = measure(args, uri, receiver.dsn, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.mode == "inprocess":
        title = f"CPU per {args.kind} request in-process, {args.rounds} rounds of {args.requests} per variant"
    else:
        title = (
            f"worker CPU per {args.kind} request, 1 gthread worker x 4 threads under wrk -c{args.connections}, "
            f"{args.rounds} rounds of {args.seconds:g} s per variant"
        )
    figures = report(results, title)
    if args.json is not None:
        args.json.write_text(json.dumps({"mode": args.mode, "kind": args.kind, **figures}, indent=2))


if __name__ == "__main__":
    main()
