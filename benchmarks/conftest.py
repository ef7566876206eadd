"""Benchmark records: device, versions and commit go into pytest-benchmark's machine_info.

Run:  pytest benchmarks --benchmark-json benchmarks/results/<device>-<date>.json
Each file has a naive provider beside the lazyhasty ones; compare them as ratios within one run.
"""
import os
import platform
import subprocess

os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from lazyhasty import _backend  # noqa: E402


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lazyhasty"] = _backend.summary()
    machine_info["commit"] = _commit()
    machine_info["torch_threads"] = torch.get_num_threads()
    # the allocator decides much of a CPU run (page faults of freed 32 MiB+ buffers): record how it was set
    machine_info["malloc_env"] = {k: v for k, v in os.environ.items()
                                  if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                              else f"cpu: {platform.processor() or platform.machine()}")
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """Drop the records of cases that failed before their first timed round (an error or a pytest-timeout
    inside ``pedantic``): pytest-benchmark would crash writing the JSON (``min()`` of no data) and lose
    every other case's results with it (it did on the first GPU runs). The failure itself is still
    reported by pytest. A wrapper that runs first: pytest-benchmark writes the JSON in its own wrapper."""
    bench = getattr(session.config, "_benchmarksession", None)
    if bench is not None:
        bench.benchmarks[:] = [b for b in bench.benchmarks if getattr(getattr(b, "stats", None), "data", None)]
    yield
