"""A/B of the NTK engine in two source trees on cases of bench_ntk.py / bench_zoo.py, for a noisy machine.

    python benchmarks/ab_trees.py OLD_TREE NEW_TREE --rounds 4 --out benchmarks/results/x.json

Each round runs one subprocess per tree (alternating which goes first), each timing every case (one warm-up
call, then ``--reps`` calls; the median); the report gives per case the median over rounds of each tree and
the ratio new / old of those medians (below 1: the new tree is faster). Both trees run the same script from
this file, imported against their own ``lazyhasty`` (PYTHONPATH), on the same seeded models and inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {  # name -> (source, model, input shape, kernel, call); n reduced from the benchmark's where marked
    "bench_ntk:mlp-full": ("ntk", "mlp_256", (1000, 2), "full", "gram"),
    "bench_ntk:cnn-trace n=128": ("ntk", "cnn3", (128, 3, 32, 32), "trace", "gram"),
    "bench_ntk:resnet-trace n=32": ("ntk", "resnet18_w16", (32, 3, 32, 32), "trace", "gram"),
    "bench_zoo:plain-cnn full n=32": ("zoo", "plain_cnn", (32, 3, 32, 32), "full", "gram"),
    "bench_zoo:transformer-text trace": ("zoo", "TextClassifier", "tokens", "trace", "gram"),
    "bench_zoo:lstm full": ("zoo", "Recurrent", (64, 10, 8), "full", "gram"),
    "bench_zoo:multihead-attention trace": ("zoo", "Attention", (64, 10, 8), "trace", "gram"),
    "mlp-align n=2000 (tiles of 500)": ("ntk", "mlp_256", (2000, 2), "full", "alignment"),
}


def child(reps: int, only: str | None = None) -> None:
    import copy

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ntk_models
    import zoo_models
    from lazyhasty.metrics import ntk_alignment, ntk_gram

    torch.set_num_threads(int(os.environ.get("AB_THREADS", "2")))
    out = {}
    for name, (src, make, shape, kernel, call) in CASES.items():
        if only is not None and name != only:
            continue
        torch.manual_seed(0)
        model = getattr(ntk_models if src == "ntk" else zoo_models, make)().eval()
        x = torch.randint(0, 100, (32, 12)) if shape == "tokens" else torch.rand(shape) * 2 - 1
        if call == "alignment":
            m0 = copy.deepcopy(model)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.1)
            fn = lambda: ntk_alignment(model, x, m0, kernel=kernel, block_size=500)  # noqa: E731
        else:
            fn = lambda: ntk_gram(model, x, kernel=kernel)  # noqa: E731
        fn()  # warm-up: the layer and mixing checks of a structure's first call are cached
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    print("AB-RESULT " + json.dumps(out))


def _run(tree: str, reps: int, case: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, TRITON_INTERPRET="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(reps)] + ([case] if case else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("AB-RESULT ")]
    if res.returncode or not line:
        raise SystemExit(f"{tree} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(line[0][len("AB-RESULT "):])


def paired(args) -> None:
    names = [c for c in args.cases.split(",") if c] or list(CASES)
    cases = {}
    for name in names:
        pairs = []
        for r in range(args.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            got = {which: _run(getattr(args, which), args.reps, name)[name] for which in order}
            pairs.append((got["old"], got["new"]))
            print(f"{name} round {r}: old {got['old']:.3f} new {got['new']:.3f} ratio {got['new'] / got['old']:.3f}",
                  flush=True)
        ratios = [n / o for o, n in pairs]
        cases[name] = {"pair_ratios_new_over_old": ratios, "median_pair_ratio": statistics.median(ratios),
                       "ratio_of_medians": statistics.median(n for _, n in pairs) / statistics.median(o for o, _ in pairs),
                       "old_s": [o for o, _ in pairs], "new_s": [n for _, n in pairs]}
        with open(args.out, "w") as f:  # written after each case: a cut-short run keeps what it measured
            json.dump({"what": "paired A/B of the NTK engine (benchmarks/ab_trees.py --paired): per case, old and new "
                               "subprocesses back to back; median of the pairs' ratios new / old",
                       "rounds": args.rounds, "reps_per_run": args.reps, "cases": cases, **json.loads(args.meta)},
                      f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--meta", default="{}", help="JSON merged into the record (device, commits)")
    ap.add_argument("--paired", action="store_true",
                    help="per case, old and new subprocesses back to back (alternating which goes first): the "
                         "ratio of each pair, which shares the machine's load of that moment; the median of them")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args()
    if args.paired:
        return paired(args)
    runs = {"old": [], "new": []}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for which in order:
            tree = getattr(args, which)
            env = dict(os.environ, PYTHONPATH=tree, TRITON_INTERPRET="1")
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(args.reps)], env=env,
                                 capture_output=True, text=True, cwd=tree)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("AB-RESULT ")]
            if res.returncode or not line:
                raise SystemExit(f"{which} tree failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
            runs[which].append(json.loads(line[0][len("AB-RESULT "):]))
            print(f"round {r} {which}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[which][-1].items()), flush=True)
    cases = {}
    for name in CASES:
        old = statistics.median(run[name] for run in runs["old"])
        new = statistics.median(run[name] for run in runs["new"])
        cases[name] = {"old_median_s": old, "new_median_s": new, "ratio_new_over_old": new / old,
                       "old_rounds_s": [run[name] for run in runs["old"]],
                       "new_rounds_s": [run[name] for run in runs["new"]]}
    record = {"what": "A/B of the NTK engine, old tree vs new tree, alternating subprocesses (benchmarks/ab_trees.py)",
              "rounds": args.rounds, "reps_per_round": args.reps, "cases": cases, **json.loads(args.meta)}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    for name, c in cases.items():
        print(f"{name:40s} ratio new/old {c['ratio_new_over_old']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        main()
