"""Reproductions of the paper's experiments (``lazyhasty run NAME``), each writing a run directory with
config.json, JSONL logs, PNG figures and summary.json (every claim as a measured, signed number)."""
from .common import EXPERIMENTS, run_experiment  # noqa: F401
