"""Comparing runs at equal progress (mean training loss), not at equal step.

The progress column is made monotone by a running minimum (as the paper does); every other column is
interpolated, for every run, at the first time the run's progress reached each value of one common grid.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ProgressTable:
    """``grid`` ``[G]`` progress values (decreasing: from early to late training) and, per run, every logged
    numeric column interpolated on it: ``table[run_name][column]`` -> ``[G]``."""

    def __init__(self, progress: str, grid: np.ndarray, columns: dict[str, dict[str, np.ndarray]]):
        self.progress, self.grid, self.columns = progress, grid, columns

    def __getitem__(self, run: str) -> dict[str, np.ndarray]:
        return self.columns[run]

    @property
    def runs(self) -> list[str]:
        return list(self.columns)

    def to_rows(self) -> list[dict]:
        rows = []
        for g, value in enumerate(self.grid):
            row = {self.progress: float(value)}
            for run, cols in self.columns.items():
                for col, v in cols.items():
                    row[f"{run}/{col}"] = float(v[g])
            rows.append(row)
        return rows


def _rows_of(run):
    rows = getattr(run, "rows", run)
    name = getattr(run, "name", None)
    return name, list(rows)


def monotone(values: np.ndarray) -> np.ndarray:
    """Running minimum: progress that never goes back (noisy SGD losses)."""
    return np.minimum.accumulate(np.asarray(values, dtype=np.float64))


def at_equal_progress(runs: Sequence, progress: str = "train_loss", grid: int | np.ndarray = 200,
                      names: Sequence[str] | None = None) -> ProgressTable:
    """Interpolate every logged numeric column of every run onto one grid of progress values.

    Columns a run did not log at some rows are interpolated over the rows that have them.

    Args:
        runs: [Run][lazyhasty.train.Run] objects or lists of row dicts.
        progress: the column that measures progress (made monotone by a running minimum).
        grid: a number of points spanning the progress range all runs reached (from the largest initial
            value to the smallest final value any run did not go below, i.e. the intersection), or explicit
            values `[G]`.
        names: the runs' names in the table (default: taken from the runs).

    Returns:
        A [ProgressTable][lazyhasty.analysis.ProgressTable]: `table.grid` `[G]`, `table[run_name][column]` `[G]`.

    Example:
        >>> a = [{"step": s, "train_loss": 1.0 / (s + 1), "acc": s / 10} for s in range(10)]
        >>> table = at_equal_progress([a, a], grid=5, names=["lazy", "hasty"])
        >>> table["lazy"]["acc"].shape
        (5,)
    """
    if not runs:
        raise ValueError("no runs to compare")
    parsed = []
    for i, run in enumerate(runs):
        name, rows = _rows_of(run)
        name = (names[i] if names else None) or name or f"run{i}"
        if not rows:
            raise ValueError(f"run {name!r} has no logged rows")
        if any(progress not in r for r in rows):
            raise ValueError(f"run {name!r}: some rows have no {progress!r} column")
        p = monotone([r[progress] for r in rows])
        if not np.all(np.isfinite(p)):
            raise ValueError(f"run {name!r}: non-finite {progress!r}")
        parsed.append((name, rows, p))
    hi = min(p[0] for _, _, p in parsed)
    lo = max(p[-1] for _, _, p in parsed)
    if isinstance(grid, int):
        if grid < 2:
            raise ValueError("grid must have at least 2 points")
        if not hi > lo:
            raise ValueError(f"the runs' {progress!r} ranges do not overlap ([{lo}, {hi}])")
        g = np.linspace(hi, lo, grid)
    else:
        g = np.asarray(grid, dtype=np.float64)
    columns = {}
    for name, rows, p in parsed:
        # first time each progress value was reached: keep the first row of every flat stretch
        first = np.concatenate([[True], p[1:] < p[:-1]])
        cols = {}
        keys = [k for k in rows[0] if k != progress] + sorted({k for r in rows for k in r} - set(rows[0]))
        for key in keys:
            vals = np.array([r.get(key, np.nan) if isinstance(r.get(key, np.nan), (int, float)) else np.nan
                             for r in rows], dtype=np.float64)
            if np.all(np.isnan(vals)):
                continue
            sel = first & ~np.isnan(vals)
            if sel.sum() == 0:
                continue
            xk, yk = p[sel][::-1], vals[sel][::-1]
            cols[key] = np.interp(g, xk, yk, left=np.nan, right=np.nan) if xk.size > 1 else np.where(
                g == xk[0], yk[0], np.nan)
        cols[progress] = g.copy()
        columns[name] = cols
    return ProgressTable(progress, g, columns)


def difference(table: ProgressTable, run_a: str, run_b: str, columns: Sequence[str] | None = None) -> dict:
    """`run_a - run_b` per column at equal progress, e.g. non-linear minus linear per group loss.

    Args:
        table: a [ProgressTable][lazyhasty.analysis.ProgressTable] holding both runs.
        run_a: the run subtracted from.
        run_b: the run subtracted.
        columns: the columns (default: every column both runs have, except the progress one).

    Returns:
        `{column: [G] differences}`.

    Example:
        >>> a = [{"step": s, "train_loss": 1.0 / (s + 1), "acc": s / 10} for s in range(10)]
        >>> table = at_equal_progress([a, a], grid=5, names=["lazy", "hasty"])
        >>> float(abs(difference(table, "hasty", "lazy")["acc"]).max())
        0.0
    """
    a, b = table[run_a], table[run_b]
    keys = columns or [k for k in a if k in b and k != table.progress]
    missing = [k for k in keys if k not in a or k not in b]
    if missing:
        raise KeyError(f"columns not logged by both runs: {missing}")
    return {k: a[k] - b[k] for k in keys}


def plot_groups(table: ProgressTable, columns: Sequence[str], path, *, title: str = "",
                ylabel: str = "loss", styles=("-", "--", ":", "-.")) -> None:
    """Per-group curves against progress for every run (paper Fig. 2 left): colour = group, style = run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(columns))))
    for r, run in enumerate(table.runs):
        for c, col in zip(colors, columns):
            if col in table[run]:
                ax.plot(table.grid, table[run][col], styles[r % len(styles)], color=c, label=f"{col} ({run})")
    ax.set_xlabel(f"{table.progress} (training progress)")
    ax.set_ylabel(ylabel)
    ax.invert_xaxis()
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_linearity(table: ProgressTable, path, *, metrics=("sign_similarity", "repr_alignment", "ntk_alignment"),
                   title: str = "") -> None:
    """Linearity metrics against progress for every run (paper Fig. 2 right)."""
    plot_groups(table, [m for m in metrics if any(m in table[r] for r in table.runs)], path, title=title,
                ylabel="linearity metric")


def plot_runs(runs: Sequence, progress: str, columns: Sequence[str], path, *, ylabel: str = "",
              styles=("-", "--", ":", "-.")) -> None:
    """Each run's logged columns against its own (monotone) progress, over the run's whole range.

    Unlike [plot_groups][lazyhasty.analysis.plot_groups], runs are not cut to the range they share (e.g. a
    lazy run that never reaches the non-linear run's final loss). `progress="step"`: steps left to right; a
    loss: decreasing, as the paper's figures read.

    Args:
        runs: [Run][lazyhasty.train.Run] objects or lists of row dicts.
        progress: the x-axis column.
        columns: the columns to plot, one colour each.
        path: where the figure is written.
        ylabel: the y-axis label.
        styles: line styles, one per run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(columns))))
    for r, run in enumerate(runs):
        name, rows = _rows_of(run)
        name = name or f"run{r}"
        p = np.asarray([row[progress] for row in rows], float) if progress == "step" else monotone(
            [row[progress] for row in rows])
        for c, col in zip(colors, columns):
            sel = [i for i, row in enumerate(rows) if isinstance(row.get(col), (int, float))]
            if sel:
                ax.plot(p[sel], [rows[i][col] for i in sel], styles[r % len(styles)], color=c, marker=".", ms=3,
                        label=f"{col} ({name})")
    ax.set_xlabel(f"{progress} (training progress)")
    ax.set_ylabel(ylabel)
    if progress != "step":
        ax.invert_xaxis()
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class LoggedRun:
    """Rows of a Monitor log or a run directory, for plotting (``name``, ``rows``)."""

    def __init__(self, name: str, rows: list):
        self.name, self.rows = name, rows


def find_runs(paths: Sequence) -> list:
    """Run directories (``log.jsonl`` inside, searched recursively) and Monitor logs (``*.jsonl`` files)."""
    from pathlib import Path

    from .monitor import read_monitor_log

    def read_rows(path):  # a run's log.jsonl, or a Monitor log without its run header row
        return read_monitor_log(path)[1]

    found = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".jsonl":
            found.append(LoggedRun(p.stem, read_rows(p)))
        elif p.is_dir():
            logs = sorted(p.rglob("log.jsonl"))
            if not logs:
                logs = sorted(p.rglob("*.jsonl"))
            for log in logs:
                name = str(log.parent.relative_to(p)) if log.name == "log.jsonl" else log.stem
                found.append(LoggedRun(f"{p.name}/{name}" if name != "." else p.name, read_rows(log)))
        else:
            raise FileNotFoundError(f"{p}: not a run directory or a .jsonl log")
    if not found:
        raise FileNotFoundError(f"no log.jsonl or .jsonl files under {', '.join(map(str, paths))}")
    return found


def plot_logs(paths: Sequence, out, *, progress: str | None = None) -> list:
    """The paper-style figures of any runs: linearity metrics and group losses against progress.

    Args:
        paths: run directories (searched recursively for `log.jsonl`) and Monitor logs (`*.jsonl`).
        out: the folder the figures are written to.
        progress: the column on the x axis (default `train_loss` when every run has it, else `step`).

    Returns:
        The files written (`linearity.png`, `groups.png` when such columns exist).

    Raises:
        ValueError: the logs hold no rows.
    """
    from pathlib import Path

    runs = [r for r in find_runs(paths) if r.rows]
    if not runs:
        raise ValueError("the logs hold no rows")
    if progress is None:
        progress = "train_loss" if all("train_loss" in r.rows[0] for r in runs) else "step"
    if any(progress not in r.rows[0] for r in runs):
        raise ValueError(f"progress column {progress!r} is missing from some logs")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols = {k for r in runs for row in r.rows for k in row}
    written = []
    lin = [c for c in ("sign_similarity", "repr_alignment", "ntk_alignment") if c in cols]
    if lin:
        plot_runs(runs, progress, lin, out / "linearity.png", ylabel="linearity metric")
        written.append(out / "linearity.png")
    groups = sorted(c for c in cols if c.endswith("/loss") and c != progress)
    if groups:
        plot_runs(runs, progress, groups, out / "groups.png", ylabel="loss")
        written.append(out / "groups.png")
    return written


def mean_and_band(curves: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``curves`` ``[S, G]`` (NaN where a seed has no value) -> mean ``[G]`` and the lower / upper ends of the
    95% Student-t interval of the mean ``[G]`` (NaN where fewer than 2 seeds have a value)."""
    from ._stats import t_quantile

    c = np.asarray(curves, dtype=np.float64)
    n = np.isfinite(c).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(c, 0) / np.maximum(n, 1), np.nan)
        dev = np.where(np.isfinite(c), c - mean, 0.0)
        sd = np.sqrt((dev ** 2).sum(0) / np.maximum(n - 1, 1))
        t = np.array([t_quantile(0.5 + level / 2, k - 1) if k >= 2 else np.nan for k in n])
        half = np.where(n >= 2, t * sd / np.sqrt(np.maximum(n, 1)), np.nan)
    return mean, mean - half, mean + half


def plot_groups_over_seeds(tables: Sequence[ProgressTable], columns: Sequence[str], path, *, ylabel: str = "loss",
                           styles=("-", "--", ":", "-.")) -> bool:
    """Per-group curves at equal progress over seeds: the mean over seeds and its 95% band (shaded).

    Colour = group, style = run. The tables are put on the progress range every seed reached.

    Args:
        tables: one [ProgressTable][lazyhasty.analysis.ProgressTable] per seed, same runs.
        columns: the group columns to plot.
        path: where the figure is written.
        ylabel: the y-axis label.
        styles: line styles, one per run.

    Returns:
        True when the figure was written; False (nothing written) when the seeds share no range.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hi = min(t.grid[0] for t in tables)
    lo = max(t.grid[-1] for t in tables)
    if not hi > lo:
        return False
    grid = np.linspace(hi, lo, 100)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(columns))))
    for r, run in enumerate(tables[0].runs):
        for c, col in zip(colors, columns):
            curves = [np.interp(grid, t.grid[::-1], t[run][col][::-1], left=np.nan, right=np.nan)
                      for t in tables if run in t.columns and col in t[run]]
            if not curves:
                continue
            mean, low, high = mean_and_band(np.stack(curves))
            ax.plot(grid, mean, styles[r % len(styles)], color=c, label=f"{col} ({run})")
            ax.fill_between(grid, low, high, color=c, alpha=0.2, lw=0)
    ax.set_xlabel(f"{tables[0].progress} (training progress)")
    ax.set_ylabel(ylabel)
    ax.invert_xaxis()
    ax.set_title(f"mean over {len(tables)} seeds, 95% band", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
