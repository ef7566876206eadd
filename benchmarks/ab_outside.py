"""A/B of two source trees on the outside models (``benchmarks/outside_models.py``): first vs later call of
``implementation="auto"``, the layerwise and jacobian implementations, and torch.func's ``vmap(jacrev)`` (or a
per-example ``jacrev`` loop where vmap fails), in one run (issue 30 item 6: the cost model's choice against
measurement, first call against a later one).

    python benchmarks/ab_outside.py OLD_TREE NEW_TREE --cases timm-efficientnet,hf-gpt2-eager --out x.json

Each round runs one subprocess per tree (alternating which goes first), each timing every case and kernel:
the first call of ``auto`` on a fresh copy of the model (every per-model cache empty: layer check included),
then one warm-up and ``--reps`` timed calls (the median) of each provider. torch.func runs in the same child (its
time does not depend on the tree; measured beside each tree's for ratios within one child). The report: per case,
kernel and tree the median over rounds, ``auto``'s choice and the ratio of the slower of layerwise / jacobian to
the faster (the cost model is wrong when it picked the one 1.2x slower).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(cases: list[str], reps: int) -> None:
    import copy

    import torch

    sys.path.insert(0, HERE)
    from bench_outside import jacrev_loop_ntk
    from bench_ntk import torchfunc_ntk
    from outside_models import cases as all_cases

    from lazyhasty.metrics import ntk_gram
    from lazyhasty.ntk import explain

    import warnings
    warnings.filterwarnings("ignore")
    C = all_cases()
    out = {}
    for case in cases:
        make_model, make_x, n = C[case]
        torch.manual_seed(0)
        model, x = make_model().eval(), make_x(n)
        try:
            torchfunc_ntk(model, x[:2], "trace")
            base_name, base = "torch.func", torchfunc_ntk
        except Exception:  # noqa: BLE001 (vmap cannot run: masked attention, data-dependent pooling)
            base_name, base = "jacrev-loop", jacrev_loop_ntk
        for kernel in ("trace", "full"):
            row = {}
            fresh = copy.deepcopy(model)
            t = time.perf_counter()
            ntk_gram(fresh, x, kernel=kernel)
            row["auto-first"] = time.perf_counter() - t
            del fresh
            plan = explain(model, x, kernel=kernel)
            row["auto_choice"] = "jacobian" if "-> jacobian" in plan.why else "layerwise"
            row["why"] = plan.why
            lw = explain(model, x, kernel=kernel, implementation="layerwise")
            sizes = {p["name"]: torch.Size(p["shape"]).numel() for p in lw.parameters}
            row["fallback_share"] = round(sum(sizes[g] for g in lw.generic) / sum(sizes.values()), 4)
            calls = {"auto": lambda: ntk_gram(model, x, kernel=kernel),
                     "layerwise": lambda: ntk_gram(model, x, kernel=kernel, implementation="layerwise"),
                     "jacobian": lambda: ntk_gram(model, x, kernel=kernel, implementation="jacobian"),
                     base_name: lambda: base(model, x, kernel)}
            for name, fn in calls.items():
                fn()  # warm-up (the layer check of this implementation, caches)
                times = []
                for _ in range(reps):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                row[name] = statistics.median(times)
            out.setdefault(case, {})[kernel] = row
            print(case, kernel, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "why"},
                  file=sys.stderr, flush=True)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--cases", required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    cases = args.cases.split(",")
    runs = {"old": [], "new": []}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for which in order:
            tree = getattr(args, which)
            env = dict(os.environ, PYTHONPATH=tree)
            got = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", ",".join(cases),
                                  str(args.reps)], env=env, cwd=tree, capture_output=True, text=True, check=False)
            sys.stderr.write(got.stderr[-3000:])
            runs[which].append(json.loads(got.stdout.strip().splitlines()[-1]))
    report = {}
    for which, rs in runs.items():
        for case in cases:
            for kernel in ("trace", "full"):
                rows = [r[case][kernel] for r in rs]
                agg = {k: (statistics.median(v[k] for v in rows) if isinstance(rows[0][k], float) else rows[0][k])
                       for k in rows[0]}
                base = agg.get("torch.func", agg.get("jacrev-loop"))
                lw, jac = agg["layerwise"], agg["jacobian"]
                picked = lw if agg["auto_choice"] == "layerwise" else jac
                agg["speedup_auto_vs_torch_func"] = base / agg["auto"]
                agg["first_over_later"] = agg["auto-first"] / agg["auto"]
                agg["cost_model_picked_over_best"] = picked / min(lw, jac)
                report.setdefault(case, {}).setdefault(kernel, {})[which] = agg
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.new, capture_output=True, text=True).stdout.strip()
    old_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.old, capture_output=True,
                                text=True).stdout.strip()
    result = {"device": "cpu-2core (shared with other jobs)", "torch": torch.__version__, "commit": commit,
              "old": args.old, "old_commit": old_commit or "fdaa4de", "new": args.new, "rounds": args.rounds,
              "reps": args.reps, "cases": report}
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2].split(","), int(sys.argv[3]))
    else:
        main()
