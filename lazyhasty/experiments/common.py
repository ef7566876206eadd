"""Shared pieces of the experiments: run directories, models, claims, summaries."""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .claims import Claim  # noqa: F401  (experiments import it from here)


@dataclass
class Context:
    out: Path
    seed: int = 0
    device: str = "cpu"
    quick: bool = False
    progress: bool = True
    options: dict = field(default_factory=dict)
    overwrite: bool = False
    resume: bool = False  # continue this seed's runs from their checkpoints (set by run_experiment)

    def opt(self, name: str, default, quick=None):
        """An experiment option: the config file / CLI value, else the quick or full default."""
        if name in self.options and self.options[name] is not None:
            return self.options[name]
        return quick if (self.quick and quick is not None) else default

    def path(self, *parts) -> Path:
        p = self.out.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def write_summary(ctx: Context, experiment: str, claims: list[Claim], started: float, extra: dict | None = None) -> dict:
    summary = {
        "experiment": experiment,
        "wall_time_s": round(time.time() - started, 2),
        "quick": ctx.quick,
        "seed": ctx.seed,
        "device": ctx.device,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "claims": [c.as_dict() for c in claims],
        "all_hold": all(c.holds for c in claims),
        **(extra or {}),
    }
    tmp = ctx.path("summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, ctx.path("summary.json"))
    return summary


def write_config(ctx: Context, experiment: str, config: dict) -> None:
    cfg = {"experiment": experiment, "seed": ctx.seed, "device": ctx.device, "quick": ctx.quick, **config}
    ctx.path("config.json").write_text(json.dumps(cfg, indent=1, default=str))


def mlp4(width: int = 100, d_in: int = 2, out: int = 1, seed: int = 0) -> nn.Sequential:
    """The paper's 4-layer ReLU MLP."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out))


def small_cnn(in_ch: int, classes: int, size: int, width: int = 16, seed: int = 0) -> nn.Sequential:
    """Three ReLU convolutions and a linear head; no BatchNorm (as the paper's alpha-scaled runs)."""
    torch.manual_seed(seed)
    s = size
    s2 = (s + 1) // 2
    s4 = (s2 + 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * width * s4 * s4, classes))


def load_image_dataset(name: str, root: str | None, split: str):
    from .. import data as D

    if name == "digits":
        ds = D.digits()
        g = torch.Generator().manual_seed(1234)
        perm = torch.randperm(len(ds), generator=g)  # fixed train/test split of the 1797 images
        return ds[perm[:1400]] if split == "train" else ds[perm[1400:]]
    if name == "fashion-mnist":
        return D.fashion_mnist(root, split)
    if name == "cifar10":
        if root is None:
            raise ValueError("cifar10 needs --root (a folder with cifar-10-batches-py/)")
        return D.cifar10(root, split)
    raise ValueError(f"unknown dataset {name!r}: choose digits, fashion-mnist or cifar10")


EXPERIMENTS: dict[str, callable] = {}
OPTIONS: dict[str, dict[str, type]] = {}  # experiment -> {option: type}, checked before anything runs

# options of every experiment that trains several alphas with train_regimes (see _regime_runs.py)
REGIME_OPTIONS = {"epochs": int, "batch_size": int, "lr": float, "width": int, "lazy_factor": float,
                  "log_q": float, "probe_every": int, "fork_step": int}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list of numbers"}


@dataclass(frozen=True)
class ExperimentSpec:
    """How an experiment runs over seeds: default seed counts, whether a killed seed's runs resume from their
    checkpoints (else the seed starts again, its partial directory kept aside), and an optional ``aggregate``
    hook writing figures over seeds (``aggregate(ctx, seed_dirs, per_seed_summaries) -> [file names]``)."""

    seeds: int
    quick_seeds: int
    resumable: bool = True
    aggregate: callable = None


SPECS: dict[str, ExperimentSpec] = {}


def register(name: str, options: dict[str, type], *, seeds: int = 10, quick_seeds: int = 3, resumable: bool = True,
             aggregate=None):
    """Register an experiment with the options it reads (``ctx.opt``) and their types.

    The function runs ONE seed (``ctx.seed``) into ``ctx.out`` and returns its summary; ``run_experiment``
    runs it for every seed (option ``seeds``, default ``seeds`` / ``quick_seeds``) and decides the claims over
    seeds (:mod:`lazyhasty.experiments.claims`)."""
    def deco(fn):
        EXPERIMENTS[name] = fn
        OPTIONS[name] = dict(options, seeds=int)
        SPECS[name] = ExperimentSpec(seeds, quick_seeds, resumable, aggregate)
        return fn
    return deco


def check_options(name: str, options: dict) -> None:
    """Unknown keys and values of the wrong type are errors naming the key (a typo must not run the defaults)."""
    import difflib

    valid = OPTIONS[name]
    for key, value in options.items():
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown option {key!r} for experiment {name!r}{hint}; valid options: "
                             + ", ".join(sorted(valid)))
        if value is None:
            continue
        want = valid[key]
        ok = (isinstance(value, want) and not isinstance(value, bool)) if want is not float else (
            isinstance(value, (int, float)) and not isinstance(value, bool))
        if want is list:
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not ok:
            raise ValueError(f"option {key!r} expects {_TYPE_NAMES[want]}, got {value!r} ({type(value).__name__})")


_ESTIMATE_OPTIONS = ("cscore_ratios", "cscore_runs", "cscore_epochs")


def _check_cscore_source(options: dict) -> None:
    """The C-scores come from a file (CIFAR-10's official ones) or are estimated (other datasets): an option
    of the other source would be ignored, so it is an error naming it."""
    dataset = options.get("dataset") or "digits"
    if dataset == "cifar10":
        given = [k for k in _ESTIMATE_OPTIONS if options.get(k) is not None]
        if given:
            raise ValueError(f"option(s) {', '.join(map(repr, given))} estimate C-scores, but dataset 'cifar10' uses "
                             "the official C-scores (option 'cscores' = their file): drop them")
    elif options.get("cscores") is not None:
        raise ValueError(f"option 'cscores' (a file of official C-scores) applies to dataset 'cifar10' only; for "
                         f"{dataset!r} the C-scores are estimated (options {', '.join(_ESTIMATE_OPTIONS)}): drop it")


def run_experiment(name: str, ctx: Context) -> dict:
    """Run experiment ``name`` over its seeds into ``ctx.out`` (resuming the seeds not yet done) and return
    the summary over seeds. See :mod:`lazyhasty.experiments._seeds`."""
    import importlib

    for mod in ("yinyang", "label_noise", "cscores", "spurious", "quadratic", "modes"):
        try:
            importlib.import_module(f"{__package__}.{mod}")  # registers it
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{mod}":
                raise

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    check_options(name, ctx.options)
    if name == "cscores":
        _check_cscore_source(ctx.options)
    import importlib.util

    needs = {"matplotlib": "plots", "scipy": "theory"} if name == "quadratic" else {"matplotlib": "plots"}
    if name in ("label-noise", "cscores", "spurious") and ctx.options.get("dataset", "digits") == "digits":
        needs["sklearn"] = "data"
    missing = [f"{mod} (pip install 'lazyhasty[{extra}]')" for mod, extra in needs.items()
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise ValueError(f"experiment {name!r} needs " + ", ".join(missing))
    from ._seeds import run_seeds

    return run_seeds(name, ctx, EXPERIMENTS[name], SPECS[name])
