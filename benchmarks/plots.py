"""Draw the documentation's benchmark plots from the JSON records in ``benchmarks/results/``.

    python benchmarks/plots.py OUT_DIR          (the docs build runs it: docs/_hooks/benchmark_plots.py)

Each plot is drawn from one record, the newest of its kind (by the record's own ``datetime``, else its file
time), and names that record and the commit it came from under the axes. Nothing here is measured: a plot
only shows numbers a record holds.

Plots:
    ntk_vs_torch_func.png     lazyhasty's speed-up over torch.func and naive autograd per model and kernel
    ntk_vs_libraries.png      lazyhasty, torch.func, neural-tangents, nngeometry and naive per model (seconds)
    memory_vs_n.png           time and peak memory of the streamed ntk_alignment vs the n x n kernels, against n
    gpu.png                   the GPU record's cases
    distributed.png           ntk_alignment over 1 and 2 processes (seconds and parallel efficiency), every record
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _records(pattern: str, exclude: str | None = None) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(RESULTS.glob(pattern)):
        if exclude and re.search(exclude, path.name):
            continue
        out.append((path, json.loads(path.read_text())))
    return out


def newest(pattern: str, exclude: str | None = None) -> tuple[Path, dict]:
    """The newest record matching ``pattern`` (a glob in ``benchmarks/results``).

    Args:
        pattern: file-name glob, e.g. ``"ntk-zoo-cpu-*.json"``.
        exclude: regular expression; matching file names are skipped.

    Returns:
        ``(path, record)`` of the record with the latest ``datetime`` (pytest-benchmark's) or file time.

    Raises:
        FileNotFoundError: no record matches.
    """
    recs = _records(pattern, exclude)
    if not recs:
        raise FileNotFoundError(f"no benchmark record matches {RESULTS / pattern}")
    return max(recs, key=lambda r: (r[1].get("datetime") or r[1].get("started_utc") or "", r[0].stat().st_mtime))


def provenance(path: Path, record: dict) -> str:
    """The line each plot carries: record file, commit and machine."""
    info = record.get("machine_info", record)
    commit = (info.get("commit") or "unknown")[:10]
    named = re.search(r"-([0-9a-f]{10})(?:[-.])", path.name)
    if named and named.group(1) != commit:
        commit = f"{named.group(1)} (machine_info.commit reads {commit}: see results/README.md)"
    device = info.get("device") or info.get("machine") or ""
    return f"record: benchmarks/results/{path.name}; commit {commit}; {device}"


def _medians(record: dict) -> dict[str, dict[str, tuple[float, dict]]]:
    groups: dict[str, dict[str, tuple[float, dict]]] = {}
    for b in record["benchmarks"]:
        params = b.get("params") or {}
        provider = (params.get("provider") or params.get("what")
                    or ", ".join(f"{k}={v}" for k, v in params.items() if k != "device") or "lazyhasty")
        groups.setdefault(b["group"], {})[provider] = (b["stats"]["median"], b.get("extra_info") or {})
    return groups


def _finish(fig, ax_or_axes, path: Path, record: dict, out: Path):
    source = provenance(path, record)
    fig.text(0.01, 0.005, source, fontsize=7, color="0.35", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=110, metadata={"Source": source})  # the PNG's tEXt chunk names its record too
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def plot_ntk_vs_torch_func(out: Path) -> Path:
    """Speed-ups of lazyhasty over torch.func and naive autograd, one bar pair per case (newest zoo record)."""
    import matplotlib.pyplot as plt

    path, rec = newest("ntk-zoo-cpu-*.json", exclude="malloc-tuned")
    rows = []
    for group, prov in _medians(rec).items():
        ours = prov.get("lazyhasty") or prov.get("lazyhasty-auto")
        if ours is None:
            continue
        case = group.replace("ntk ", "").replace(" cpu", "").replace("zoo ", "")
        tf = prov.get("torch.func")
        nv = prov.get("naive")
        rows.append((case, tf[0] / ours[0] if tf else None, nv[0] / ours[0] if nv else None))
    rows.sort(key=lambda r: r[1] or 0)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.4))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r[2] or 0 for r in rows], 0.4, color="#bbbbbb", label="over naive autograd")
    ax.barh([y - 0.2 for y in ys], [r[1] or 0 for r in rows], 0.4, color="#1f77b4", label="over torch.func vmap(jacrev)")
    for y, r in zip(ys, rows):
        if r[1] is None:
            ax.text(1.05, y - 0.2, "torch.func fails", va="center", fontsize=7)
        else:
            ax.text(r[1] * 1.05, y - 0.2, f"{r[1]:.2f}x", va="center", fontsize=7)
    ax.axvline(1, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=8)
    ax.set_xlabel("speed-up of lazyhasty (median time ratio, log scale)")
    ax.set_title("Empirical NTK on the CPU: lazyhasty against torch.func and naive autograd")
    ax.legend(loc="lower right", fontsize=8)
    return _finish(fig, ax, path, rec, out / "ntk_vs_torch_func.png")


def plot_ntk_vs_libraries(out: Path) -> Path:
    """Seconds per case for every provider of the record that ran the other libraries (neural-tangents)."""
    import matplotlib.pyplot as plt

    path, rec = newest("ntk-cpu-*neural-tangents*.json")
    providers = [("lazyhasty", "#1f77b4"), ("torch.func", "#ff7f0e"), ("nt-structured", "#2ca02c"),
                 ("nt-jacobian", "#98df8a"), ("nngeometry", "#9467bd"), ("naive", "#bbbbbb")]
    groups = {g: p for g, p in _medians(rec).items() if g.startswith("ntk ") and "lazyhasty" in p}
    fig, ax = plt.subplots(figsize=(10, 4.6))
    width = 0.8 / len(providers)
    for i, (name, color) in enumerate(providers):
        xs = [j + (i - len(providers) / 2 + 0.5) * width for j in range(len(groups))]
        ts = [p.get(name, (float("nan"),))[0] for p in groups.values()]
        ax.bar(xs, ts, width, color=color, label=name.replace("nt-", "neural-tangents "))
    labels = []
    for g, p in groups.items():
        n = p["lazyhasty"][1].get("n")
        labels.append(g.replace("ntk ", "").replace(" cpu", "") + (f"\nn = {n}" if n else ""))
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median seconds (log scale)")
    ax.set_title("Empirical NTK on the CPU, every library on the same models and weights (missing bar: not run)")
    ax.legend(fontsize=8, ncol=3)
    return _finish(fig, ax, path, rec, out / "ntk_vs_libraries.png")


def plot_memory_vs_n(out: Path) -> Path:
    """Time and peak memory against n: streamed ntk_alignment vs the materialized kernels."""
    import matplotlib.pyplot as plt

    path, rec = newest("memory-vs-n-*.json")
    series: dict[str, list[tuple[int, float, float]]] = {}
    for b in rec["benchmarks"]:
        provider = b["params"]["provider"]
        series.setdefault(provider, []).append(
            (b["extra_info"]["n"], b["stats"]["median"], b["extra_info"]["peak_mem_bytes"] / 2**20))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    style = {"lazyhasty": ("o-", "#1f77b4", "lazyhasty ntk_alignment (streamed)"),
             "materialized": ("s--", "#d62728", "ntk_gram x 2 + kernel_alignment (n x n)")}
    for provider, pts in series.items():
        pts.sort()
        marker, color, label = style.get(provider, ("^-", "k", provider))
        ns = [p[0] for p in pts]
        ax_t.plot(ns, [p[1] for p in pts], marker, color=color, label=label)
        ax_m.plot(ns, [p[2] for p in pts], marker, color=color, label=label)
    if "lazyhasty" in series:
        ns = [p[0] for p in series["lazyhasty"]]
        ax_m.plot(ns, [2 * 4 * n * n / 2**20 for n in ns], ":", color="0.5", label="two float32 n x n kernels")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (examples)")
        ax.grid(alpha=0.3, which="both")
    ax_t.set_ylabel("median seconds")
    ax_m.set_ylabel("peak memory above the inputs (MiB)")
    ax_t.set_title("time")
    ax_m.set_title("peak memory")
    ax_m.legend(fontsize=7)
    fig.suptitle("Trace-kernel alignment with init, MLP 2-256-256-256-1, CPU")
    note = rec["machine_info"].get("load_note")
    if note:  # a record that says its times were taken under load shows it on the time panel
        ax_t.text(0.02, 0.98, "times under load: upper bounds\n(see the record's load_note)", transform=ax_t.transAxes,
                  va="top", fontsize=7, color="#d62728")
    return _finish(fig, (ax_t, ax_m), path, rec, out / "memory_vs_n.png")


def plot_gpu(out: Path) -> Path:
    """The GPU record's cases as bars of seconds, torch.func's extrapolations as ranges."""
    import matplotlib.pyplot as plt

    path, rec = newest("NVIDIA-*.json")
    rows = []
    for group, prov in _medians(rec).items():
        for provider, (t, extra) in prov.items():
            n = extra.get("n")
            case = re.sub(r" n=\S+", "", group.replace(" cuda", ""))
            label = f"{case}: {provider}" + (f" (n = {n:,})" if isinstance(n, int) else "")
            ext = next((v for k, v in extra.items() if k.startswith("extrapolated_")), None)
            rows.append((label, t, ext, extra.get("peak_mem_bytes")))
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 1.6))
    ys = list(range(len(rows)))[::-1]
    for y, (label, t, ext, peak) in zip(ys, rows):
        is_baseline = "torch.func" in label or "naive" in label
        ax.barh(y, t, 0.6, color="#ff7f0e" if is_baseline else "#1f77b4")
        note = f"{t:.3g} s" + (f", {peak / 2**30:.1f} GiB" if peak else "")
        right = t
        if ext:
            ax.plot(ext, [y, y], "|-", color="#d62728")
            note += f"; extrapolated {ext[0]:.3g}-{ext[1]:.4g} s"
            right = ext[1]
        ax.text(right * 1.3, y, note, va="center", fontsize=7)
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(right=ax.get_xlim()[1] * 300)
    ax.set_xlabel("median seconds (log scale). Orange: baselines on the sizes they fit; red: extrapolated to the "
                  "lazyhasty case's n (linear to quadratic)", fontsize=8)
    ax.set_title(f"GPU record: {rec['machine_info'].get('device')}")
    return _finish(fig, ax, path, rec, out / "gpu.png")


def plot_distributed(out: Path) -> Path:
    """Seconds on 1 and 2 processes and the parallel efficiency, one panel per scaling record."""
    import matplotlib.pyplot as plt

    recs = _records("distributed-scaling-*.json")
    if not recs:
        raise FileNotFoundError(f"no benchmark record matches {RESULTS / 'distributed-scaling-*.json'}")
    fig, axes = plt.subplots(1, len(recs), figsize=(5 * len(recs), 4), squeeze=False)
    for ax, (path, rec) in zip(axes[0], recs):
        procs = sorted(rec["median_s"], key=int)
        ts = [rec["median_s"][p] for p in procs]
        ax.bar(procs, ts, 0.5, color="#1f77b4")
        ax.plot(procs, [ts[0] / int(p) for p in procs], "k:o", label="ideal (time / processes)")
        for p, t in zip(procs, ts):
            ax.text(p, t / 2, f"{t:.0f} s", ha="center", color="white", fontsize=9)
        ax.set_xlabel("gloo processes (1 thread each)")
        ax.set_ylabel("median seconds")
        ax.set_title(f"n = {rec['n']}: parallel efficiency {rec['efficiency']:.2f}\n"
                     f"{path.name}, commit {rec.get('commit', 'unknown')[:10]}", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(recs[0][1]["what"], fontsize=9)
    source = "; ".join(provenance(p, r) for p, r in recs)
    fig.text(0.01, 0.005, source, fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "distributed.png", dpi=110, metadata={"Source": source})
    plt.close(fig)
    return out / "distributed.png"


PLOTS = (plot_ntk_vs_torch_func, plot_ntk_vs_libraries, plot_memory_vs_n, plot_gpu, plot_distributed)


def make_all(out_dir: str | Path) -> list[Path]:
    """Draw every plot into ``out_dir``.

    Args:
        out_dir: folder for the PNGs (created).

    Returns:
        The PNG paths, in the order of ``PLOTS``.
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot(out) for plot in PLOTS]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print("\n".join(map(str, make_all(sys.argv[1]))))
