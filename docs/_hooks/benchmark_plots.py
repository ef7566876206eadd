"""mkdocs hook: draw the benchmark plots from benchmarks/results/*.json at every build.

The PNGs go to build/benchmark-plots/ (never into docs/, so ``mkdocs serve`` does not rebuild in a loop) and
are added to the site as ``figures/benchmarks/NAME.png``, where docs/benchmarks.md shows them.
"""
import importlib.util
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]


def _plots_module():
    spec = importlib.util.spec_from_file_location("lazyhasty_benchmark_plots", ROOT / "benchmarks" / "plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files, config):
    out = ROOT / "build" / "benchmark-plots"
    for png in _plots_module().make_all(out):
        files.append(File.generated(config, f"figures/benchmarks/{png.name}", abs_src_path=str(png)))
    return files
