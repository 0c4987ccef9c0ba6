"""The stack runners live in bench/stack.py (the demo and the benchmarks use them too)."""
from bench.stack import ROOT, Gunicorn, Prometheus, free_port  # noqa: F401
