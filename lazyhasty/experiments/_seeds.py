"""One experiment over several seeds: a directory per seed, resumable seed by seed, claims decided over seeds.

Layout of an experiment directory ``OUT``::

    OUT/experiment.json      what defines the experiment (name, options, quick, base seed, device) and the
                             number of seeds asked for; a rerun into OUT with the same definition resumes.
                             It marks OUT as lazyhasty's (a non-empty OUT without it is refused) and lists in
                             "written" what lazyhasty wrote there: all that ``--overwrite`` deletes
    OUT/lazyhasty.lock       held (flock) by the process running the experiment: a second one is refused
    OUT/seed<s>/             one seed: its config.json, runs/ (Trainer run directories), figures, summary.json
    OUT/summary.json         every claim over seeds: per-seed values, mean, standard error, 95% t interval,
                             seeds with the expected sign, state (holds / fails / inconclusive)
    OUT/claims.png           per-seed points, mean and interval of every claim
    OUT/*.png                curves over seeds (mean and 95% band) and the experiment's own aggregate figures

Seed ``s`` of base seed ``b`` (``--seed``) trains with seed ``1000 b + s``: initialization, data order,
label-noise draw and any estimated C-scores change with it. A killed experiment rerun with the same command
keeps the finished seeds, continues the interrupted one from its runs' checkpoints (the Trainer's exact
resume) and runs the rest; ``seeds`` may be raised on a rerun to add seeds.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .._runlog import LOCK_NAME, locked, refuse_foreign
from .claims import claims_over_seeds, plot_claims

MANIFEST = "experiment.json"
_IDENTITY = ("experiment", "options", "quick", "base_seed", "device")


def seed_value(base_seed: int, index: int) -> int:
    """The training seed of seed number ``index`` of an experiment run with ``--seed base_seed``."""
    return 1000 * int(base_seed) + int(index)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)  # never a half-written summary or manifest


def command_line(manifest: dict) -> str:
    """The ``lazyhasty run`` command that (re)creates an experiment directory's definition."""
    opts = dict(manifest["options"])
    parts = ["lazyhasty", "run", manifest["experiment"]]
    if manifest.get("quick"):
        parts.append("--quick")
    for key in ("dataset", "root"):
        if opts.get(key) is not None:
            parts += [f"--{key}", str(opts.pop(key))]
        else:
            opts.pop(key, None)
    if manifest.get("base_seed"):
        parts += ["--seed", str(manifest["base_seed"])]
    if manifest.get("device", "cpu") != "cpu":
        parts += ["--device", manifest["device"]]
    for key, value in sorted(opts.items()):
        if value is not None:
            parts += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    parts += ["--set", f"seeds={manifest['seeds']}"]
    return " ".join(parts)


# what lazyhasty writes at the top of OUT besides the entries it records in the manifest's "written"
_OWN = (MANIFEST, "config.json", "summary.json", LOCK_NAME, MANIFEST + ".tmp", "config.json.tmp", "summary.json.tmp")


def _is_old_layout(out: Path) -> bool:
    return (out / "runs").is_dir() and (out / "summary.json").is_file() and not (out / MANIFEST).exists()


def _refuse_foreign(out: Path) -> None:
    """OUT must be new, empty, or created by lazyhasty (its manifest, or the one-seed layout of old)."""
    if not _is_old_layout(out):
        refuse_foreign(out, (MANIFEST,), "experiment directory")


def _delete_own(out: Path, old_manifest: dict | None) -> None:
    """``--overwrite``: delete what lazyhasty wrote in OUT (never the user's files beside it)."""
    names = set(_OWN) - {LOCK_NAME}  # the lock is held by this process now
    if old_manifest is not None:
        names |= {n for n in old_manifest.get("written", []) if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")}
    else:  # the one-seed layout of old: its runs, summary and the figures it lists
        names.add("runs")
        try:
            names |= {f for f in json.loads((out / "summary.json").read_text()).get("figures", [])
                      if isinstance(f, str) and "/" not in f}
        except (OSError, ValueError, AttributeError):
            pass
    for name in names:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def record_written(out: Path, *names: str) -> None:
    """Add top-level entries of OUT to the manifest's ``written``: what ``--overwrite`` may delete."""
    path = out / MANIFEST
    manifest = json.loads(path.read_text())
    written = manifest.setdefault("written", [])
    new = [n for n in names if n not in written]
    if new:
        written.extend(new)
        _write_json(path, manifest)


def _prepare(name: str, ctx, seeds: int) -> dict:
    """Create, resume or (with ``overwrite``) replace the experiment directory; returns its manifest."""
    out = ctx.out
    manifest = {"experiment": name, "options": {k: v for k, v in ctx.options.items() if k != "seeds" and v is not None},
                "quick": bool(ctx.quick), "base_seed": int(ctx.seed), "device": str(ctx.device), "seeds": seeds,
                "layout": 2, "written": []}
    path = out / MANIFEST
    old_layout = _is_old_layout(out)
    old = None
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except (OSError, ValueError) as exc:
            if not ctx.overwrite:
                raise FileExistsError(f"{path} is unreadable ({exc}): choose another --out, or pass --overwrite") from exc
            old = {}
    if ctx.overwrite:
        _delete_own(out, None if old_layout else (old or {}))
    elif old is not None:
        diffs = [f"{k}: {old.get(k)!r} before, {manifest[k]!r} now" for k in _IDENTITY if old.get(k) != manifest[k]]
        if diffs:
            raise FileExistsError(f"{out} holds another experiment (" + "; ".join(diffs) + "): choose another --out, "
                                  "or pass --overwrite to replace it")
        manifest["written"] = [n for n in old.get("written", []) if isinstance(n, str)]
    elif old_layout:
        raise FileExistsError(f"{out} already holds an experiment: choose another --out, or pass --overwrite "
                              "to replace its runs and summary")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, manifest)
    return manifest


def _set_aside(seed_dir: Path) -> Path:
    """An interrupted seed that cannot resume mid-way starts again; its partial files are kept beside it."""
    k = 1
    while (aside := seed_dir.with_name(f"{seed_dir.name}.incomplete-{k}")).exists():
        k += 1
    record_written(seed_dir.parent, aside.name)
    seed_dir.rename(aside)
    return aside


def run_seeds(name: str, ctx, fn, spec) -> dict:
    seeds = ctx.options.get("seeds")
    seeds = int(seeds if seeds is not None else (spec.quick_seeds if ctx.quick else spec.seeds))
    if seeds < 1:
        raise ValueError(f"option 'seeds' must be >= 1, got {seeds}")
    _refuse_foreign(ctx.out)  # before the lock file makes OUT non-empty
    with locked(ctx.out, "experiment directory"):  # a second `lazyhasty run` into OUT is refused, naming us
        return _run_seeds(name, ctx, fn, spec, seeds)


def _run_seeds(name: str, ctx, fn, spec, seeds: int) -> dict:
    manifest = _prepare(name, ctx, seeds)
    per_seed, seed_dirs = [], []
    for s in range(seeds):
        seed_dir = ctx.out / f"seed{s}"
        done = seed_dir / "summary.json"
        value = seed_value(ctx.seed, s)
        if done.exists():
            try:
                summary = json.loads(done.read_text())
                if not isinstance(summary, dict) or not isinstance(summary.get("claims"), list):
                    raise ValueError("not a seed's summary (no list of claims)")
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"{done} is damaged ({str(exc)[:80]}); it was left as it is. Restore it, or move "
                                 f"it aside to rerun seed {s} (its runs resume from their checkpoints)") from None
            if summary.get("seed") != value:
                raise FileExistsError(f"{done} was written for seed {summary.get('seed')}, expected {value}: "
                                      "pass --overwrite")
            if ctx.progress:
                print(f"[{name}] seed {s + 1}/{seeds}: done earlier", file=sys.stderr)
        else:
            resume = seed_dir.exists()
            if resume and not spec.resumable:
                aside = _set_aside(seed_dir)
                print(f"[{name}] seed {s + 1}/{seeds} was interrupted: starting it again ({aside.name} kept)",
                      file=sys.stderr)
                resume = False
            elif resume:
                print(f"[{name}] seed {s + 1}/{seeds} was interrupted: resuming its runs", file=sys.stderr)
            elif ctx.progress:
                print(f"[{name}] seed {s + 1}/{seeds} (training seed {value})", file=sys.stderr)
            seed_ctx = replace(ctx, out=seed_dir, seed=value, resume=resume,
                               options={k: v for k, v in ctx.options.items() if k != "seeds"})
            record_written(ctx.out, seed_dir.name)
            seed_dir.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(value)
            summary = fn(seed_ctx)
        per_seed.append(summary)
        seed_dirs.append(seed_dir)
    return _aggregate(name, ctx, spec, manifest, per_seed, seed_dirs)


def _aggregate(name, ctx, spec, manifest, per_seed, seed_dirs) -> dict:
    aggregation_started = time.time()
    claims = claims_over_seeds([p["claims"] for p in per_seed])
    figures = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        record_written(ctx.out, "claims.png")
        plot_claims(claims, ctx.out / "claims.png", title=f"{name}: {len(per_seed)} seeds, mean and 95% interval")
        figures.append("claims.png")
        figures += _curves_over_seeds(ctx.out, per_seed, seed_dirs)
    extra = {}
    if spec.aggregate is not None:
        extra = spec.aggregate(ctx, seed_dirs, per_seed) or {}
        figures += extra.pop("figures", [])
    record_written(ctx.out, *[f for f in figures if "/" not in f])  # --overwrite deletes them, nothing else
    # a seed's figures that have no version over seeds are shown as seed 0's (the report says so by its path)
    figures += [f"{seed_dirs[0].name}/{f}" for f in per_seed[0].get("figures", [])
                if f not in figures and (seed_dirs[0] / f).exists()]
    states = [c["state"] for c in claims]
    summary = {
        "experiment": name,
        "seeds": len(per_seed),
        "seed_values": [p["seed"] for p in per_seed],
        "base_seed": ctx.seed,
        "quick": ctx.quick,
        "device": ctx.device,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "command": command_line(manifest),
        # the seeds' own training times (also those finished before a resume) plus this aggregation
        "wall_time_s": round(sum(p.get("wall_time_s", 0.0) for p in per_seed) + time.time() - aggregation_started, 2),
        "claims": claims,
        "all_hold": all(s == "holds" for s in states),
        "verdicts": {s: states.count(s) for s in ("holds", "fails", "inconclusive")},
        "per_seed": [str(d.relative_to(ctx.out) / "summary.json") for d in seed_dirs],
        "figures": figures,
        **extra,
    }
    config = json.loads((seed_dirs[0] / "config.json").read_text()) if (seed_dirs[0] / "config.json").exists() else {}
    config.update(seed=ctx.seed, seeds=len(per_seed), seed_values=summary["seed_values"])
    _write_json(ctx.out / "config.json", config)
    _write_json(ctx.out / "summary.json", summary)
    return summary


def _curves_over_seeds(out: Path, per_seed: list[dict], seed_dirs: list[Path]) -> list[str]:
    """The curves each seed declares (``summary["curves"]``): mean over seeds and 95% band, at equal progress."""
    from ..analysis import at_equal_progress, plot_groups_over_seeds
    from ..train import Run

    written = []
    for spec in per_seed[0].get("curves", []):
        tables = []
        for d in seed_dirs:
            runs = [Run(p.parent, name=p.parent.name.split("-fork")[0])
                    for p in sorted((d / "runs").glob("*/log.jsonl"))]
            try:
                tables.append(at_equal_progress(runs, progress=spec["progress"], grid=100))
            except ValueError:  # no runs, or a seed whose regimes share no progress range: not in the band
                pass
        if tables and plot_groups_over_seeds(tables, spec["columns"], out / spec["file"], ylabel=spec.get("ylabel", "")):
            written.append(spec["file"])
    return written
