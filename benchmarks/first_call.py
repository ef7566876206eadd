"""First call against later calls of ``ntk_gram`` (issue 30: a user's first logging step must not take minutes).

    python benchmarks/first_call.py OUT.json [case ...]

Per model of ``benchmarks/outside_models.py`` (at the benchmark's n) and kernel: a fresh deep copy of the model
(its per-model caches cold) in a process that has already run other models, one first call (the layer check on a
perturbed twin, the per-example-copy decisions, the batch-mixing and batched-backward checks included), then four
untimed calls (the measurement of the two ways of the output gradients, ``Featurizer._replicas``, as
``bench_outside``'s warm-up), then two later calls; the ratio first / the faster later one (before ``aef4571ddd``
the later calls were the second and third, two of those measurement turns). Every timed call starts after ``gc.collect()``, first and
later alike: without it a gen-2 collection of the deep copy's garbage (~0.2 s here) landed in the first call.
``torch.set_num_threads(THREADS)`` (default 1: with two threads on a shared 2-core machine the times swung
3-100x; ``bench_outside``'s first / later column is the same ratio at 2 threads); ``BENCH_OUTSIDE_SCALE=s`` multiplies every n by s. An A/B of two trees runs this twice, one after the
other, with ``PYTHONPATH`` pointing at each.
"""
import copy
import gc
import json
import os
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from outside_models import cases  # noqa: E402

from lazyhasty.metrics import ntk_gram  # noqa: E402


def main(out_path, wanted):
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    rows = {}
    for name, (make_model, make_x, n) in cases().items():
        if wanted and name not in wanted:
            continue
        torch.manual_seed(0)
        model, x = make_model().eval(), make_x(n)
        ntk_gram(copy.deepcopy(model), x, kernel="trace")  # the process's own warm-up (imports, kernels)
        for kernel in ("trace", "full"):
            fresh = copy.deepcopy(model)
            gc.collect()
            t0 = time.perf_counter()
            ntk_gram(fresh, x, kernel=kernel)
            first = time.perf_counter() - t0
            for _ in range(4):  # the two ways of the output gradients measured (bench_outside's warm-up)
                ntk_gram(fresh, x, kernel=kernel)
            later = []
            for _ in range(2):
                gc.collect()
                t0 = time.perf_counter()
                ntk_gram(fresh, x, kernel=kernel)
                later.append(time.perf_counter() - t0)
            rows[f"{name}|{kernel}"] = {"n": n, "first_s": first, "later_s": later, "ratio": first / min(later)}
            print(f"{name:22s} {kernel:5s} n={n:3d} first {first:.3f} s, later {min(later):.3f} s: "
                  f"{first / min(later):.1f}x", flush=True)
    json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
               "scale": float(os.environ.get("BENCH_OUTSIDE_SCALE", "1")), "cases": rows},
              open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], set(sys.argv[2:]))
