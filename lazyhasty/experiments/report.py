"""``lazyhasty report RUN_DIR...``: one markdown report of the claims, with intervals, of experiment directories.

docs/EXPERIMENTS.md is this report of the full runs (``lazyhasty report DIR... --out docs/EXPERIMENTS.md
--intro docs/experiments_intro.md``): the tables and figures are generated from the directories' summaries,
never typed. Figures are copied next to the report (``figures/<tag>_<name>.png``) and linked relatively.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .claims import format_interval

TITLES = {
    "yinyang": "Fig. 1 — yin-yang",
    "label-noise": "Fig. 2 bottom — label noise",
    "cscores": "Fig. 2 top — C-score deciles",
    "spurious": "Fig. 3 — spurious feature",
    "quadratic": "Fig. 4 — the quadratic model",
    "modes": "Sec. 4 — modes of the initial tangent kernel",
}
_MARK = {"holds": "**holds**", "fails": "**FAILS**", "inconclusive": "inconclusive"}


def load_experiment(path) -> tuple[dict, dict]:
    """``(summary, config)`` of an experiment directory; an error naming the directory when it holds none
    (or only an older one-seed summary without intervals)."""
    d = Path(path)
    f = d / "summary.json"
    if not f.exists():
        raise FileNotFoundError(f"{d}: no summary.json (not an experiment directory, or the experiment has not "
                                "finished: rerun its command to resume it)")
    summary = json.loads(f.read_text())
    if not summary.get("claims") or "ci95" not in summary["claims"][0]:
        raise ValueError(f"{f} has no claims over seeds (written by an older lazyhasty): rerun the experiment")
    config = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
    return summary, config


def section(path, out_dir: Path | None, level: int = 2) -> str:
    """The markdown of one experiment directory (figures copied under ``out_dir/figures`` when given).

    Args:
        path: the experiment directory (with ``summary.json``).
        out_dir: where the report goes (``None``: figures are linked where they are, not copied).
        level: the heading level of the section.

    Returns:
        The markdown text.

    Raises:
        ValueError: the summary names a figure outside the experiment directory (nothing is read from it).
    """
    d = Path(path)
    summary, config = load_experiment(d)
    name = summary["experiment"]
    dataset = config.get("dataset")
    title = TITLES.get(name, name) + (f" ({dataset})" if dataset else "")
    if summary.get("quick"):
        title += ", quick mode"
    v = summary["verdicts"]
    lines = [f"{'#' * level} {title}", "", "```bash", summary["command"], "```", "",
             f"{summary['seeds']} seeds (training seeds {_seed_range(summary['seed_values'])}), "
             f"wall time {_duration(summary['wall_time_s'])} on {summary.get('cpu_count', '?')} CPU cores "
             f"({summary.get('device', 'cpu')}, torch {summary.get('torch', '?')}). "
             f"Claims: {v['holds']} hold, {v['fails']} fail, {v['inconclusive']} inconclusive.", "",
             "| claim | mean [95% interval] | expected | seeds with the expected sign | verdict |",
             "| --- | --- | --- | --- | --- |"]
    for c in summary["claims"]:
        lines.append(f"| {_cell(c['claim'])} | {format_interval(c)} | {c['expected']} | {c['sign_held']}/{c['n']}"
                     f"{'' if c['n'] == summary['seeds'] else ' (of ' + str(summary['seeds']) + ' seeds)'} | "
                     f"{_MARK[c['state']]} |")
    lines.append("")
    inside = d.resolve()
    for fig in summary.get("figures", []):
        src = d / str(fig)
        # a summary names files to copy into the report: only files of the experiment directory are read
        if not isinstance(fig, str) or not src.resolve().is_relative_to(inside):
            raise ValueError(f"{d / 'summary.json'}: figure {fig!r} is not a file inside the experiment directory "
                             f"{d} (an absolute path, '..', or a link out of it): not read. Remove it from "
                             "the summary's figures.")
        if not src.is_file():
            continue
        if out_dir is not None:
            tag = f"{name}_{dataset}" if dataset else name
            tag += "_quick" if summary.get("quick") else ""
            dst = out_dir / "figures" / f"{tag}_{fig}".replace("-", "_").replace("/", "_")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            link = dst.relative_to(out_dir).as_posix()
        else:
            link = src.as_posix()
        lines.append(f"![{name} {fig}]({link})")
    cfg = {k: v for k, v in config.items() if k not in ("seed_values",)}
    lines += ["", "<details><summary>config.json</summary>", "", "```json", json.dumps(cfg, indent=1), "```",
              "</details>", ""]
    return "\n".join(lines)


def report(paths, out=None, *, intro: str = "", title: str = "Experiments") -> str:
    """The report of every experiment directory in ``paths``; written to ``out`` (a .md file) when given.
    Claims are listed with mean, 95% interval and verdict; a closing table counts the verdicts."""
    out_path = Path(out) if out else None
    out_dir = out_path.parent if out_path else None
    parts, totals = [f"# {title}", ""], []
    if intro:
        parts += [intro.rstrip(), ""]
    overview = ["| experiment | seeds | holds | fails | inconclusive | wall time |", "| --- | --- | --- | --- | --- | --- |"]
    bodies = []
    for p in paths:
        summary, config = load_experiment(p)
        v = summary["verdicts"]
        name = TITLES.get(summary["experiment"], summary["experiment"])
        if config.get("dataset"):
            name += f" ({config['dataset']})"
        overview.append(f"| {name} | {summary['seeds']} | {v['holds']} | {v['fails']} | {v['inconclusive']} | "
                        f"{_duration(summary['wall_time_s'])} |")
        totals.append(v)
        bodies.append(section(p, out_dir))
    overview.append(f"| all | | {sum(t['holds'] for t in totals)} | {sum(t['fails'] for t in totals)} | "
                    f"{sum(t['inconclusive'] for t in totals)} | |")
    parts += overview + ["", *bodies]
    text = "\n".join(parts)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out_path)
    return text


def _cell(text: str) -> str:
    """Text for a markdown table cell (a ``|`` in a claim would split the row)."""
    return str(text).replace("|", "\\|")


def _seed_range(values) -> str:
    values = list(values)
    if values and values == list(range(values[0], values[0] + len(values))) and len(values) > 2:
        return f"{values[0]}-{values[-1]}"
    return ", ".join(map(str, values))


def _duration(seconds: float) -> str:
    s = float(seconds)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"
