"""The stack runners live in bench/stack.py (the demo and the benchmarks use them too)."""
from bench.stack import ROOT, Gunicorn, Prometheus, free_port, run_command, stop_process  # noqa: F401
