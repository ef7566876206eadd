"""Print a pytest-benchmark JSON as ratio tables: median time and peak memory relative to the naive provider.

    python benchmarks/summarize.py benchmarks/results/cpu-2026-11-23.json [--markdown] [--ratio PROVIDER]

--ratio PROVIDER: speed-ups relative to that provider (default naive), e.g. --ratio torch.func.
"""
import json
import sys
from collections import defaultdict


def markdown(data) -> str:
    """The same as one markdown table (device, versions, then a row per benchmark and its extra_info)."""
    info = data["machine_info"]
    lines = [f"device: {info.get('device')}; torch {info['lazyhasty']['torch']}; triton {info.get('triton')}; "
             f"commit {info.get('commit', '')[:10]}", "",
             "| group | case | median s | peak MB | extra |", "| --- | --- | --- | --- | --- |"]
    for b in data["benchmarks"]:
        params = ", ".join(f"{k}={v}" for k, v in (b.get("params") or {}).items())
        extra = {k: v for k, v in b["extra_info"].items() if k != "peak_mem_bytes"}
        peak = b["extra_info"].get("peak_mem_bytes")
        lines.append(f"| {b['group']} | {params} | {b['stats']['median']:.4f} | "
                     f"{'' if peak is None else f'{peak / 2**20:.0f}'} | {json.dumps(extra) if extra else ''} |")
    return "\n".join(lines)


def main(path, md=False, baseline="naive"):
    data = json.load(open(path))
    if md:
        print(markdown(data))
        return
    info = data["machine_info"]
    print(f"device: {info.get('device')}  torch {info['lazyhasty']['torch']}  commit {info.get('commit', '')[:10]}")
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        provider = b["params"].get("provider") or b["params"].get("what") or b["name"]
        groups[b["group"]][provider] = (b["stats"]["median"], b["extra_info"].get("peak_mem_bytes", 0))
    for g, rows in groups.items():
        t0, m0 = rows.get(baseline, (None, None))
        print(f"\n{g}")
        print(f"  {'provider':<26}{'median s':>10}{'speed-up':>10}{'peak MB':>10}{'mem ratio':>11}")
        for p, (t, m) in rows.items():
            su = f"{t0 / t:.2f}x" if t0 else ""
            mr = f"{m0 / max(m, 1):.1f}x" if m0 else ""
            print(f"  {p:<26}{t:>10.4f}{su:>10}{m / 2**20:>10.1f}{mr:>11}")
    # per provider: the geometric mean of its speed-ups over the baseline, over the groups that have both
    means = defaultdict(list)
    for rows in groups.values():
        if baseline in rows:
            for p, (t, _) in rows.items():
                if p != baseline:
                    means[p].append(rows[baseline][0] / t)
    if means:
        print(f"\ngeometric mean of speed-ups over {baseline}:")
        for p, r in means.items():
            gm = 1.0
            for v in r:
                gm *= v ** (1 / len(r))
            print(f"  {p:<26}{gm:>8.2f}x  over {len(r)} groups (min {min(r):.2f}x, max {max(r):.2f}x)")


if __name__ == "__main__":
    args = sys.argv[1:]
    base = args[args.index("--ratio") + 1] if "--ratio" in args else "naive"
    paths = [a for i, a in enumerate(args) if not a.startswith("--") and (i == 0 or args[i - 1] != "--ratio")]
    if len(paths) != 1:
        sys.exit(__doc__)
    main(paths[0], md="--markdown" in args, baseline=base)
