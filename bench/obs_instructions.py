"""What the observability costs a request in instructions, counted by callgrind: deterministic
where CPU time on a shared 2-core box is not, so a lever of 1 % shows in one run.

    python -m bench.obs_instructions [--kinds list create] [--requests 100] [--ablation]

Each variant is bench/obs_cost.py's in-process child (the app built as a gunicorn worker has it,
each request handed to a thread as gthread does, on a throwaway Postgres seeded with 1,000
books) run under `valgrind --tool=callgrind --collect-atstart=no --toggle-collect=_operator_call`:
after a warm-up, each measured request runs inside `operator.call`, so callgrind counts the
request thread's instructions from the WSGI call to the body's close and nothing else: not the
start-up, nor the warm-up, nor the once-a-second threads (metrics sampler, log watcher), nor
Postgres. Instructions are not time (a cache miss or a system call counts as one), but
observability is Python work, which they track. The children run at once, about 50x slower than
without callgrind (the start-up, ~1.5 CPU minutes a child, dominates): off and on for both kinds,
4 children, about 6 minutes on two cores; with `--ablation`, 10 children, about 17.

Variants (production settings, console logging off as the bench's "on"):
    off           no access line, no log file, no metrics, no Sentry (bench/obs_cost.py's `off`)
    on            the JSON access line to the log file, metrics (exemplars, the pool), Sentry to a
                  local receiver (its logging hook; nothing is sent for a 2xx)
    on-metrics, on-file, on-sentry    `on` with that part off: the ablation
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

from bench.harness.sentry_receiver import SentryReceiver
from bench.harness.throwaway_postgres import database
from bench.obs_cost import LOGS, OFF, RECEIVER, InProcess, migrated_and_seeded, variant_env

ON = {**LOGS, "METRICS_ENABLED": "1", "LOG_TO_FILE": "1", "LOG_CONSOLE": "0", "SENTRY_DSN": RECEIVER}
VARIANTS: dict[str, dict[str, str]] = {
    "off": OFF,
    "on": ON,
    "on-metrics": {**ON, "METRICS_ENABLED": "0"},
    "on-file": {**ON, "LOG_TO_FILE": "0"},
    "on-sentry": {**ON, "SENTRY_DSN": ""},
}
# The part each ablation takes away from `on`.
PARTS = {
    "on-metrics": "metrics (exporter hooks, sample writes, exemplar, pool histogram)",
    "on-file": "the access line formatted and written to the file",
    "on-sentry": "Sentry (its logging hook, scope work)",
}
MEASURED_FUNCTION = "_operator_call"  # bench/obs_cost_child.py runs each measured request in it
WARM_UP = 30


def callgrind(out_file: Path) -> tuple[str, ...]:
    return (
        "valgrind",
        "--tool=callgrind",
        "--collect-atstart=no",
        f"--toggle-collect={MEASURED_FUNCTION}",
        f"--callgrind-out-file={out_file}",
        "--log-file=" + str(out_file.with_suffix(".valgrind.log")),
    )


def instructions(out_file: Path) -> int:
    """The instructions (Ir) callgrind counted, from its output's `totals:` line."""
    match = re.search(r"^totals:\s+(\d+)", out_file.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no totals in {out_file}")
    return int(match.group(1))


def measure(kinds: list[str], names: list[str], requests: int, uri: str, dsn: str, workdir: Path) -> dict:
    """{kind: {variant: instructions per request}}, every child run at once (the counts do not
    depend on what else runs)."""
    runs = [(kind, name) for kind in kinds for name in names]
    children: dict[tuple[str, str], InProcess] = {}
    outputs = {run: workdir / f"{run[0]}-{run[1]}.callgrind" for run in runs}
    try:
        for kind, name in runs:
            variant_dir = workdir / f"{kind}-{name}"
            variant_dir.mkdir()
            env = variant_env(VARIANTS[name], uri, variant_dir, dsn)
            env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts in every run
            children[kind, name] = InProcess(env, variant_dir, kind, wrapper=callgrind(outputs[kind, name]))
        for child in children.values():
            child.ready()
        for child in children.values():
            child.run(WARM_UP)
        for child in children.values():
            child.run(requests, measured=True)
    finally:
        for child in children.values():
            child.stop(timeout=300)  # callgrind writes its counts at exit
    return {kind: {name: instructions(outputs[kind, name]) / requests for name in names} for kind in kinds}


def report(kind: str, counts: dict[str, float]) -> dict:
    print(f"\n{kind}: thousands of instructions per request (callgrind, the request thread)")
    for name, count in counts.items():
        print(f"  {name:<12} {count / 1000:>9,.0f}")
    figures: dict = {"instructions": counts}
    if "on" in counts and "off" in counts:
        figures["ratio"] = counts["off"] / counts["on"]
        print(f"  off/on ratio {figures['ratio']:.3f}   (the tax: {(counts['on'] - counts['off']) / 1000:,.0f}k)")
    parts = {part: counts["on"] - counts[part] for part in PARTS if part in counts and "on" in counts}
    for part, saved in parts.items():
        print(f"  {PARTS[part]:<66} {saved / 1000:>+7,.0f}k")
    figures["parts"] = parts
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", choices=("list", "create"), default=["list", "create"])
    parser.add_argument("--requests", type=int, default=100, help="measured requests per variant")
    parser.add_argument("--ablation", action="store_true", help="also `on` with each part off in turn")
    parser.add_argument("--db-uri", default=None, help="a migrated, seeded database (default: a throwaway server)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")

    workdir = Path(tempfile.mkdtemp(prefix="obs-instructions-"))
    try:
        with database(args.db_uri, "obs_instructions", migrated_and_seeded) as uri, SentryReceiver() as receiver:
            variants = list(VARIANTS) if args.ablation else ["off", "on"]
            counts = measure(args.kinds, variants, args.requests, uri, receiver.dsn, workdir)
        figures = {kind: report(kind, counts[kind]) for kind in args.kinds}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
