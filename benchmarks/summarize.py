"""Print a pytest-benchmark JSON as ratio tables: median time and peak memory relative to the naive provider.

    python benchmarks/summarize.py benchmarks/results/cpu-2026-11-23.json
"""
import json
import sys
from collections import defaultdict


def main(path):
    data = json.load(open(path))
    info = data["machine_info"]
    print(f"device: {info.get('device')}  torch {info['lazyhasty']['torch']}  commit {info.get('commit', '')[:10]}")
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        provider = b["params"].get("provider") or b["params"].get("what") or b["name"]
        groups[b["group"]][provider] = (b["stats"]["median"], b["extra_info"].get("peak_mem_bytes", 0))
    for g, rows in groups.items():
        t0, m0 = rows.get("naive", (None, None))
        print(f"\n{g}")
        print(f"  {'provider':<26}{'median s':>10}{'speed-up':>10}{'peak MB':>10}{'mem ratio':>11}")
        for p, (t, m) in rows.items():
            su = f"{t0 / t:.2f}x" if t0 else ""
            mr = f"{m0 / max(m, 1):.1f}x" if m0 else ""
            print(f"  {p:<26}{t:>10.4f}{su:>10}{m / 2**20:>10.1f}{mr:>11}")


if __name__ == "__main__":
    main(sys.argv[1])
