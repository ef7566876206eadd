"""Alpha-scaled training with probes, crash-safe run directories and exact resume.

A run directory holds ``config.json``, ``log.jsonl`` (append-only, one row per log, flushed and fsync'd)
and ``checkpoint.pt`` (model incl. f_0, optimizer, RNG states, step, logging state; written to a temp
file then renamed). A run killed at any point (SIGKILL included) and resumed with ``resume=True``
continues from the last checkpoint, recomputes the log rows written after it (each checked against the
row on disk), and ends with the same rows and parameters as an uninterrupted run (deterministic on CPU).
No row on disk is ever lost: see `lazyhasty._runlog` for the rules on torn or damaged logs.

A resume is refused, naming the reason, when anything that defines the run differs: the config, the
model's modules and parameter shapes, the training data (a hash over its examples and labels, in order)
and the probe sets; a checkpoint is refused when its checksum does not match its content or it carries
another run's id (each run's id is written in its ``config.json`` and in every checkpoint).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._progress import Progress
from ._runlog import (LogDamaged, RunLocked, RunLog, atomic_write, locked, payload_digest,  # noqa: F401 (users
                      read_rows, refuse_foreign)  # catch LogDamaged / RunLocked from here)
from .data import Dataset
from .losses import LOSSES, per_example_loss, predictions_correct  # noqa: F401  (re-exported)
from .regimes import AlphaScaled, scaled_lr


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN/inf loss; the run stopped, its log and last checkpoint are kept."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run (compared on resume).

    Attributes:
        steps: optimizer steps in total.
        lr: the alpha = 1 learning rate; the optimizer uses `lr / alpha^2` when `scale_lr`.
        alpha: the scale of [AlphaScaled][lazyhasty.regimes.AlphaScaled] (1: standard, 100: lazy).
        center: train `alpha (f - f_0)` instead of `f_0 + alpha (f - f_0)`.
        scale_lr: divide `lr` by `alpha^2`.
        batch_size: examples per minibatch; None = full-batch gradient descent.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        loss: `"cross_entropy"`, `"logistic"` or `"mse"`.
        log_every: log every N steps, or, with `log_geometric=q`, when the training loss first falls below
            `L0 q^m` (m = 1, 2, ...; the authors used q = 0.96; the first and last steps are always logged).
        log_geometric: the `q` above, or None.
        probe_every: linearity probes at every m-th log (0: never).
        probes: which linearity probes (`"sign_similarity"`, `"repr_alignment"`, `"ntk_alignment"`).
        ntk_kernel: `"trace"`, `"full"` or `"diagonal"`, the tangent kernel of `ntk_alignment`.
        modes: with r > 0, every log also records the residuals `f_t - y` on the probe set projected on the
            top-r eigenvectors of `f_0`'s trace kernel there (`mode/0` .. `mode/{r-1}`; their eigenvalues go
            to `modes.json` in the run directory).
        track_linearized: also train the exact linearization of the initial model
            ([Linearized][lazyhasty.regimes.Linearized], learning rate `lr`: the alpha -> infinity limit of
            this run) on the same batches, and log `lin_distance`, the RMS over the probe set of
            `|f_t(x) - f_lin,t(x)|` (about twice the cost per step).
        snapshot_steps: steps at which the inner model's parameters (before that step's update) are saved to
            `snapshots/step-<s>.pt` in the run directory, to fork another regime from there
            (`compare_regimes(fork_from=...)`, `AlphaScaled(at=...)`).
        seed: the seed of the minibatch order and of the torch RNG at the start of training (dropout).
        eval_batch_size: examples per forward when the probe data sets are evaluated.
    """

    steps: int
    lr: float
    alpha: float = 1.0
    center: bool = False
    scale_lr: bool = True
    batch_size: int | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: str = "cross_entropy"
    log_every: int | None = 100
    log_geometric: float | None = None
    probe_every: int = 1
    probes: tuple = ("sign_similarity", "repr_alignment", "ntk_alignment")
    ntk_kernel: str = "trace"
    modes: int = 0
    track_linearized: bool = False
    snapshot_steps: tuple = ()
    seed: int = 0
    eval_batch_size: int = 1024

    def validate(self) -> None:
        def integer(name, lo, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}{' or None' if optional else ''}, got {v!r}")

        def number(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")

        integer("steps", 1)
        integer("batch_size", 1, optional=True)
        integer("log_every", 1, optional=True)
        integer("probe_every", 0)
        integer("modes", 0)
        if not isinstance(self.snapshot_steps, (tuple, list)) or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.snapshot_steps):
            raise ValueError(f"snapshot_steps must be a tuple of non-negative integers, got {self.snapshot_steps!r}")
        integer("seed", 0)
        integer("eval_batch_size", 1)
        for name in ("lr", "alpha", "momentum", "weight_decay"):
            number(name)
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("momentum and weight_decay must be >= 0")
        if self.ntk_kernel not in ("trace", "full", "diagonal"):
            raise ValueError(f"ntk_kernel must be 'trace', 'full' or 'diagonal', got {self.ntk_kernel!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not self.lr > 0:
            raise ValueError("lr must be > 0")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be >= 1 or None (full batch)")
        if self.log_geometric is not None and not 0 < self.log_geometric < 1:
            raise ValueError("log_geometric must be in (0, 1)")
        if self.log_geometric is None and (self.log_every is None or self.log_every < 1):
            raise ValueError("give log_every >= 1 or log_geometric")
        unknown = set(self.probes) - {"sign_similarity", "repr_alignment", "ntk_alignment"}
        if unknown:
            raise ValueError(f"unknown probes {sorted(unknown)}")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["probes"] = list(self.probes)
        d["snapshot_steps"] = list(self.snapshot_steps)
        return d


# --- run directory ------------------------------------------------------------------------------------
def _rng_state(torch_only: bool = False) -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    if not torch_only:
        st.update({"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
                   "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2])})
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(st["python"]), st["python_pos"]))
    np.random.set_state(("MT19937", np.array(st["numpy"], dtype=np.uint32), st["numpy_pos"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def read_config(path: Path) -> dict:
    """A run's ``config.json``; a missing or corrupt file is an error naming it."""
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a lazyhasty run directory") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is corrupt ({str(exc)[:80]}); it was left as it is: restore it, or start a "
                         "new run directory") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is corrupt (a JSON {type(cfg).__name__}, not an object)")
    return cfg


def load_checkpoint(path: Path, device, run_id: str | None = None) -> dict:
    """``checkpoint.pt``, loaded with ``weights_only=True`` and verified against the checksum stored in it.

    Args:
        path: the checkpoint file.
        device: where its tensors go (``map_location``).
        run_id: the run's id (``config.json``); the checkpoint must carry the same (``None``: not checked).

    Returns:
        The payload (model, optimizer, rng, step, log_state, n_rows, ...), without its checksum.

    Raises:
        LogDamaged: naming the file, when it cannot be read, is not a lazyhasty checkpoint, carries no
            checksum, its content does not match the checksum, or it belongs to another run (the file is
            left as it is).
    """
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - random bytes raise anything (IndexError, KeyError, ...)
        raise LogDamaged(
            f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}): "
            "the checkpoint is damaged (truncated, overwritten, or not written by lazyhasty). It was left as it "
            "is; move it aside to recompute the run from its start (the log's rows are then checked, not "
            "lost), or restore it.") from None
    need = {"model", "optimizer", "rng", "step", "log_state", "n_rows", "row_digests"}
    if not isinstance(blob, dict) or not need <= set(blob):
        raise LogDamaged(f"{path} is not a lazyhasty checkpoint (missing "
                         f"{sorted(need - set(blob if isinstance(blob, dict) else {}))})")
    stored = blob.pop("sha256", None)
    if stored is None:
        raise LogDamaged(f"{path} carries no checksum (written by an older lazyhasty, or not by lazyhasty): it "
                         "cannot be verified. It was left as it is; move it aside to recompute the run from its "
                         "start (the log's rows are then checked, not lost).")
    if payload_digest(blob) != stored:
        raise LogDamaged(f"{path} is damaged: its content does not match the checksum stored with it (a changed "
                         "bit on disk or in a copy). It was left as it is; move it aside to recompute the run from "
                         "its start (the log's rows are then checked, not lost), or restore it.")
    if run_id is not None and blob.get("run_id") != run_id:
        raise LogDamaged(f"{path} belongs to another run (run id {blob.get('run_id')!r}, this directory's "
                         f"config.json says {run_id!r}): a checkpoint copied from another run directory. It was "
                         "left as it is; move it aside to recompute the run from its start (the log's rows are "
                         "then checked, not lost), or restore this run's own checkpoint.")
    return blob


def _save_atomically(obj, path: Path) -> None:
    """``torch.save`` to ``path.tmp``, fsync, rename: ``path`` is the old file or the whole new one.

    Raises:
        OSError: naming the temp file, when writing fails (a full disk makes ``torch.save`` raise a bare
            ``RuntimeError`` part-way); the temp file is removed, ``path`` stays as it was.
    """
    import errno
    import shutil

    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except (RuntimeError, OSError) as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        try:
            free = f"{shutil.disk_usage(tmp.parent).free} bytes free there"
        except OSError:
            free = "free space unknown"
        code = getattr(exc, "errno", None) or errno.ENOSPC
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise OSError(code, f"writing failed ({detail}): is the disk full ({free})? {path.name} and the log were "
                      "left as they were; free space, then resume", str(tmp)) from exc
    os.replace(tmp, path)


def _structure(model: nn.Module) -> str:
    """A fingerprint of the module tree (types, hyper-parameters in ``repr``) and the parameter shapes."""
    import hashlib

    desc = repr(model) + "".join(f"|{n}:{tuple(p.shape)}:{p.dtype}" for n, p in model.named_parameters())
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


class Run:
    """A finished (or stopped) run: its directory, config and logged rows."""

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.name
        self.config = read_config(self.path / "config.json")
        self.rows = read_rows(self.path / "log.jsonl")

    def column(self, key: str) -> np.ndarray:
        return np.array([r.get(key, np.nan) for r in self.rows], dtype=np.float64)

    def __repr__(self) -> str:
        return f"Run({self.name!r}, {len(self.rows)} rows)"


def _labelled_batches(ds, batch_size: int, device):
    """(x, y) batches of a Dataset (sliced) or of any loader of (x, y, ...) tuples / {"x", "y"} dicts."""
    if isinstance(ds, Dataset):
        for s in range(0, len(ds), batch_size):
            yield ds.x[s:s + batch_size], ds.y[s:s + batch_size]
        return
    for batch in ds:
        if isinstance(batch, Mapping):
            x, y = batch.get("x"), batch.get("y")
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            x, y = batch[0], batch[1]
        else:
            raise ValueError("a probe loader must yield (x, y, ...) tuples or dicts with 'x' and 'y'")
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ValueError("a probe loader's batches must hold tensors x and y")
        yield x.to(device), y.to(device)


def _hash_tensor(h, t: torch.Tensor, rows: int = 4096) -> None:
    """Feed ``t``'s dtype, shape and bytes to the hash ``h``, ``rows`` rows at a time (no full copy)."""
    h.update(f"{t.dtype}{tuple(t.shape)}:".encode())
    if t.numel() == 0:
        return
    flat = t.detach().reshape(t.shape[0], -1) if t.dim() else t.detach().reshape(1, 1)
    for s in range(0, flat.shape[0], rows):
        chunk = flat[s:s + rows].cpu().contiguous().reshape(-1)
        if chunk.numel():
            h.update(chunk.view(torch.uint8).numpy().tobytes())


def _dataset_fingerprint(ds) -> dict:
    """``{"n", "sha256"}`` of a data set: a hash over its examples and labels, so that a resumed run notices
    other data (another order, one changed label or pixel).

    A [Dataset][lazyhasty.data.Dataset] is hashed in order (the order decides the minibatches and the sums). A loader's
    batches (a probe set, evaluated only) are hashed example by example and the hashes sorted, so that a
    shuffling loader still resumes.
    """
    import hashlib

    if isinstance(ds, Dataset):
        h = hashlib.sha256()
        _hash_tensor(h, ds.x)
        _hash_tensor(h, ds.y)
        return {"n": len(ds), "sha256": h.hexdigest()}
    examples = []
    for x, y in _labelled_batches(ds, 4096, "cpu"):
        for i in range(x.shape[0]):
            h = hashlib.sha256()
            _hash_tensor(h, x[i])
            _hash_tensor(h, y[i])
            examples.append(h.hexdigest())
    return {"n": len(examples), "sha256": hashlib.sha256("".join(sorted(examples)).encode()).hexdigest()}


# --- trainer ------------------------------------------------------------------------------------------
class Trainer:
    """Train `AlphaScaled(model, alpha)` on `train` and log losses and linearity probes.

    The network trained is `f_0 + alpha (f - f_0)` at learning rate `lr / alpha^2`
    ([AlphaScaled][lazyhasty.regimes.AlphaScaled], [scaled_lr][lazyhasty.regimes.scaled_lr]); each log row
    holds the losses and accuracies of the probe data sets and, every `probe_every`-th log, the linearity
    probes of the inner model against `f_0` (sign similarity, representation and NTK alignment).

    Args:
        model: the network at init.
        train: the training [Dataset][lazyhasty.data.Dataset].
        config: the [TrainConfig][lazyhasty.train.TrainConfig] (steps, lr, alpha, ...).
        run_dir: the run directory (`config.json`, `log.jsonl`, `checkpoint.pt`).
        probes: `{"name": Dataset}` evaluated at every log (loss and accuracy, e.g. `"train/decile0"`,
            `"test/noisy"`).
        probe_set: the examples the linearity probes use.
        device: where to train (default: the device of the model's parameters, CPU when it has none).
        progress: show a progress bar.
        checkpoint_every: write a checkpoint every this many logs (at least 1).
        on_log: `on_log(row, net)`, called after each logged row (e.g. to keep predictions on a grid in
            memory).
        process_group: a `torch.distributed` group (default: the one set by `lazyhasty._dist.probes_over`,
            as `lazyhasty run --nproc N` does): every rank trains the same model and measures the linearity
            probes on its share of `probe_set`; the values are over the whole set.

    Example:
        >>> from lazyhasty.data import yinyang
        >>> ds = yinyang(1200, seed=0)
        >>> train_ds, test_ds = ds[:1000], ds[1000:]
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
        >>> config = TrainConfig(steps=1000, lr=0.1, alpha=100, loss="logistic")   # labels in {-1, +1}
        >>> t = Trainer(net, train_ds, config, run_dir="runs/a100",
        ...             probes={"test": test_ds}, probe_set=train_ds)
        >>> run = t.fit(resume=True)
    """

    def __init__(self, model: nn.Module, train: Dataset, config: TrainConfig, run_dir: str | os.PathLike, *,
                 probes: Mapping[str, Dataset] | None = None, probe_set: Dataset | None = None,
                 device: str | torch.device | None = None, progress: bool = False,
                 checkpoint_every: int = 1, on_log: Callable[[dict, nn.Module], None] | None = None,
                 process_group=None):
        config.validate()
        if not isinstance(train, Dataset):
            raise TypeError("train must be a lazyhasty.data.Dataset")
        if len(train) == 0:
            raise ValueError("the training set is empty")
        for name, ds in (probes or {}).items():
            if isinstance(ds, Dataset) and len(ds) == 0:
                raise ValueError(f"probe set {name!r} is empty")
            if not isinstance(ds, Dataset) and not hasattr(ds, "__iter__"):
                raise ValueError(f"probe set {name!r} must be a Dataset or a loader of (x, y) batches")
        self.config = config
        self.device = torch.device(device) if device is not None else next(
            (p.device for p in model.parameters()), torch.device("cpu"))
        self.net = AlphaScaled(model, config.alpha, center=config.center).to(self.device)
        self.train_ds = train.to(self.device)
        self.probes = {k: (v.to(self.device) if isinstance(v, Dataset) else v) for k, v in (probes or {}).items()}
        self.probe_set = probe_set.to(self.device) if probe_set is not None else None
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.checkpoint_every = max(1, checkpoint_every)
        self.on_log = on_log
        from . import _dist

        # linearity probes over ranks: the model is trained the same on every rank (same seed), the probe set
        # is split between them, and every rank gets the values over the whole set (rank 0's run is written)
        self.group = _dist.resolve(process_group) if process_group is not None else _dist.run_group()
        lr = scaled_lr(config.lr, config.alpha) if config.scale_lr else config.lr
        self.lin = self.lin_opt = None
        if config.track_linearized:
            from .regimes import Linearized

            self.lin = Linearized(copy.deepcopy(self.net.f0).requires_grad_(True)).to(self.device)
            self.lin_opt = torch.optim.SGD(self.lin.parameters(), lr=config.lr, momentum=config.momentum,
                                           weight_decay=config.weight_decay)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr, momentum=config.momentum,
                                   weight_decay=config.weight_decay)
        self.bs = config.batch_size or len(train)
        self.loader = train.loader(self.bs, shuffle=config.batch_size is not None, seed=config.seed)
        self.steps_per_epoch = len(self.loader)
        self._monitor = None
        self._modes = None
        self._replica = None  # the model measured by the probes over ranks

    # -- config / resume --------------------------------------------------------------------------------
    def _full_config(self) -> dict:
        return {"train": self.config.to_json(), "model": type(self.net.model).__name__,
                "n_parameters": sum(p.numel() for p in self.net.parameters()),
                "structure": _structure(self.net.model),
                "train_data": _dataset_fingerprint(self.train_ds),
                "probes": {k: _dataset_fingerprint(v) for k, v in self.probes.items()},
                "probe_set": _dataset_fingerprint(self.probe_set) if self.probe_set is not None else None}

    def _prepare_dir(self, resume: bool) -> dict | None:
        cfg = self._full_config()
        cfg_path, ckpt = self.run_dir / "config.json", self.run_dir / "checkpoint.pt"
        if cfg_path.exists():
            old = read_config(cfg_path)
            if not resume:
                raise FileExistsError(f"{self.run_dir} already holds a run: pass resume=True or another run_dir")
            if not isinstance(old.get("run_id"), str):
                raise ValueError(f"{cfg_path} has no run id: the run was written by an older lazyhasty and cannot "
                                 "be resumed safely (its checkpoints cannot be verified). Its files were left as "
                                 "they are; start it again in another run_dir.")
            self.run_id = cfg["run_id"] = old["run_id"]
            diffs = _diff(old, cfg)
            if diffs:
                what = " (the model's modules or parameter shapes changed)" if any(
                    d.startswith("structure") for d in diffs) else ""
                raise ValueError(f"cannot resume {self.run_dir} with a different config{what}: " + "; ".join(diffs))
            if ckpt.exists():
                return load_checkpoint(ckpt, self.device, run_id=self.run_id)
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # names this run in every checkpoint: another run's checkpoint is refused
        self.run_id = cfg["run_id"] = uuid.uuid4().hex
        atomic_write(cfg_path, json.dumps(cfg, indent=1).encode())
        return None

    def _checkpoint(self, step: int, state: dict, runlog: RunLog, rng: dict) -> None:
        # torch RNG as it was before this step's forward; python/numpy RNGs are not drawn from by the loop
        rng = {**_rng_state(), **rng}
        blob = {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(), "rng": rng,
                **({"linearized": self.lin.state_dict(), "lin_optimizer": self.lin_opt.state_dict()}
                   if self.lin is not None else {}),
                "step": step, "log_state": dict(state), "n_rows": len(runlog.rows), "row_digests": runlog.digests(),
                "run_id": self.run_id}
        blob["sha256"] = payload_digest(blob)  # verified on load: a flipped bit must not resume silently
        _save_atomically(blob, self.run_dir / "checkpoint.pt")

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self, ds) -> tuple[float, float]:
        was = self.net.training
        self.net.eval()
        tot, correct, n = 0.0, 0, 0
        for x, y in _labelled_batches(ds, self.config.eval_batch_size, self.device):
            out = self.net(x)
            tot += float(per_example_loss(self.config.loss, out, y).double().sum())
            correct += int(predictions_correct(self.config.loss, out, y).sum())
            n += x.shape[0]
        self.net.train(was)
        if n == 0:
            raise ValueError("a probe loader yielded no examples")
        return tot / n, correct / n

    def _linearity(self) -> dict:
        from .monitor import Monitor

        if self._monitor is None:  # f0's side (signs, features, K_0) captured once, as any training loop would
            metrics = tuple(self.config.probes) + (("ntk_rel_change",) if "ntk_alignment" in self.config.probes
                                                   else ()) + ("param_distance",)
            x = self.probe_set.x
            if self.group is not None:
                from . import _dist

                x = x[_dist.shard_rows(x.shape[0], self.group)]
            self._monitor = Monitor(self.net, x, metrics=metrics, kernel=self.config.ntk_kernel,
                                    process_group=self.group)
        if self.group is not None:
            # every rank measures rank 0's model (GPU kernels need not be bitwise equal between ranks), in a
            # replica kept across logs: the training step's graph through the model is still pending here
            from . import _dist

            if self._replica is None:
                self._replica = copy.deepcopy(self.net.model)
            _dist.broadcast_module(self.net.model, self._replica, self.group)
            return self._monitor.measure(self._replica)
        return self._monitor.measure(self.net.model)

    def _row(self, step: int, log_index: int) -> dict:
        row = {"step": step, "epoch": step / self.steps_per_epoch}
        row["train_loss"], row["train_acc"] = self._evaluate(self.train_ds)
        for name, ds in self.probes.items():
            row[f"{name}/loss"], row[f"{name}/acc"] = self._evaluate(ds)
        pe = self.config.probe_every
        if self.probe_set is not None and pe and log_index % pe == 0:
            row.update(self._linearity())
        if self.config.modes and self.probe_set is not None:
            row.update(self._mode_residuals())
        if self.lin is not None and self.probe_set is not None:
            row["lin_distance"] = self._lin_distance()
        return row

    @torch.no_grad()
    def _lin_distance(self) -> float:
        """RMS over the probe set of |f_t(x) - f_lin,t(x)| (outputs flattened per example)."""
        from ._loaders import evaluating

        tot, n = 0.0, 0
        with evaluating(self.net, self.lin):
            for xb in self.probe_set.x.split(self.config.eval_batch_size):
                d = (self.net(xb) - self.lin(xb)).double().reshape(xb.shape[0], -1)
                tot += float((d * d).sum())
                n += xb.shape[0]
        return (tot / n) ** 0.5

    def _mode_residuals(self) -> dict:
        """Residuals on the probe set in the eigenbasis of f_0's trace kernel (formed once)."""
        from .kernels import mode_residuals
        from .metrics import ntk_gram

        probe = self.probe_set
        if self._modes is None:
            r = self.config.modes
            f0 = copy.deepcopy(self.net.f0)
            names = {n for n, p in self.net.model.named_parameters() if p.requires_grad}
            for n, p in f0.named_parameters():
                p.requires_grad_(n in names)
            K0 = ntk_gram(f0, probe.x, kernel="trace").double()
            if r > K0.shape[0]:
                raise ValueError(f"modes={r} exceeds the probe set's {K0.shape[0]} examples")
            lam, V = torch.linalg.eigh(K0)
            self._modes = (lam.flip(0)[:r], V.flip(1)[:, :r])
            path = self.run_dir / "modes.json"
            if not path.exists():
                atomic_write(path, json.dumps({"eigenvalues": self._modes[0].tolist()}).encode())
        with torch.no_grad():
            was = self.net.training
            self.net.eval()
            f = torch.cat([self.net(xb) for xb in probe.x.split(self.config.eval_batch_size)]).double()
            self.net.train(was)
        f = f.reshape(f.shape[0], -1)
        y = probe.y
        if f.shape[1] == 1:
            y = y.double().reshape(-1, 1)
            if self.config.loss == "logistic" and bool(((y == 0) | (y == 1)).all()):
                y = y * 2 - 1
        res = mode_residuals(self._modes[1], f, y)  # [r, k]
        vals = res[:, 0] if res.shape[1] == 1 else res.norm(dim=1)
        return {f"mode/{i}": float(v) for i, v in enumerate(vals)}

    # -- loop --------------------------------------------------------------------------------------------
    def _batch(self, step: int):
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self.config.batch_size is None:
            return self.train_ds.x, self.train_ds.y
        idx = self.loader.order(epoch)[pos * self.bs:(pos + 1) * self.bs].to(self.device)
        return self.train_ds.x[idx], self.train_ds.y[idx]

    def fit(self, *, resume: bool = False) -> Run:
        """Train to ``config.steps``; with ``resume=True`` continue a run stopped at any point.

        A log at step s records the state before update s (step 0 = init, step ``steps`` = the end).
        The geometric policy decides on the loss of that same state (full batch: exact; minibatches:
        an EMA of minibatch losses), so each logged row is the first state below its level. The run
        directory is locked (``fcntl.flock`` on ``lazyhasty.lock``) while this runs.

        Args:
            resume: continue the run in ``run_dir`` (else a directory holding a run is an error).

        Returns:
            The finished [Run][lazyhasty.train.Run].

        Raises:
            RunLocked: another process is writing ``run_dir`` (its pid is named); nothing was touched.
            FileExistsError: ``run_dir`` holds files but no run (nothing was touched), or holds a run and
                ``resume`` is false.
            LogDamaged: the log or checkpoint cannot be resumed without losing rows (files left as they are).
            ValueError: resuming with another config, model structure or data.
            lazyhasty._dist.RankFailed: over ranks, when another rank raised (named, with its exception).
        """
        from . import _dist

        refuse_foreign(self.run_dir, ("config.json",), "run directory")
        # over ranks: a rank that raises here tells the others, waiting in the probes' collectives, at once
        with _dist.failing_together(self.group, "Trainer.fit"), locked(self.run_dir):
            return self._fit(resume)

    def _fit(self, resume: bool) -> Run:
        cfg = self.config
        ckpt = self._prepare_dir(resume)
        log_path = self.run_dir / "log.jsonl"
        torch.manual_seed(cfg.seed)
        if ckpt is not None:
            self.net.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            if self.lin is not None:
                self.lin.load_state_dict(ckpt["linearized"])
                self.lin_opt.load_state_dict(ckpt["lin_optimizer"])
            _set_rng_state(ckpt["rng"])
            start, state = ckpt["step"], ckpt["log_state"]
        else:
            start = 0
            state = {"logs": 0, "next_m": 1, "L0": None, "ema": None, "last_logged": -1}
        # rows the checkpoint knows are kept; later ones stay on disk and are checked as they are recomputed
        runlog = RunLog.open(log_path, ckpt["n_rows"] if ckpt is not None else None, self.run_dir / "checkpoint.pt",
                             digests=ckpt["row_digests"] if ckpt is not None else None)
        rows = runlog.rows
        self.net.train()
        with runlog, Progress(cfg.steps - start, "train", self.progress) as bar:
            def log_and_checkpoint(step: int, rng: dict, force_checkpoint: bool = False) -> dict:
                row = self._row(step, state["logs"])
                state["logs"] += 1
                state["last_logged"] = step
                if state["L0"] is None:
                    state["L0"] = row["train_loss"]
                runlog.append(row)
                if self.on_log:
                    self.on_log(row, self.net)
                if force_checkpoint or state["logs"] % self.checkpoint_every == 0:
                    self._checkpoint(step, state, runlog, rng)
                return row

            for step in range(start, cfg.steps):
                if step in cfg.snapshot_steps:
                    self._snapshot(step)
                rng = _rng_state(torch_only=True)  # before this step's forward: a resume replays it exactly
                x, y = self._batch(step)
                loss = per_example_loss(cfg.loss, self.net(x), y).mean()
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise NonFiniteLoss(
                        f"non-finite training loss ({lv}) at step {step} (alpha={cfg.alpha}, lr={cfg.lr}): the run "
                        f"stopped; its log ({len(rows)} rows) and last checkpoint are kept. Lower the learning rate.")
                ema_before = state["ema"]
                state["ema"] = lv if ema_before is None or cfg.batch_size is None else 0.9 * ema_before + 0.1 * lv
                if step > state["last_logged"] and self._should_log(step, state):
                    saved_ema, state["ema"] = state["ema"], ema_before  # the checkpoint replays this step
                    log_and_checkpoint(step, rng)
                    state["ema"] = saved_ema
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                if self.lin is not None:  # the linearized twin takes the same step on the same batch
                    self.lin_opt.zero_grad(set_to_none=True)
                    per_example_loss(cfg.loss, self.lin(x), y).mean().backward()
                    self.lin_opt.step()
                bar.update(1, f"loss {lv:.4f}")
            if state["last_logged"] < cfg.steps:
                row = log_and_checkpoint(cfg.steps, _rng_state(), force_checkpoint=True)
                if not math.isfinite(row["train_loss"]):
                    raise NonFiniteLoss(f"non-finite training loss at the end (step {cfg.steps}); log kept")
        return Run(self.run_dir)

    def _snapshot(self, step: int) -> None:
        path = self.run_dir / "snapshots" / f"step-{step}.pt"
        path.parent.mkdir(exist_ok=True)
        _save_atomically(self.net.model.state_dict(), path)

    def _should_log(self, step: int, state: dict) -> bool:
        cfg = self.config
        if step == 0:
            return True
        if cfg.log_geometric is None:
            return step % cfg.log_every == 0
        level = state["L0"] * cfg.log_geometric ** state["next_m"]
        if state["ema"] < level:
            while state["ema"] < state["L0"] * cfg.log_geometric ** state["next_m"]:
                state["next_m"] += 1
            return True
        return False


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_diff(a, b, f"{prefix}{k}."))
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def compare_regimes(model: nn.Module, train: Dataset, config: TrainConfig, run_root: str | os.PathLike, *,
                    alphas=(1.0, 100.0), steps: Mapping[float, int] | None = None, resume: bool = False,
                    fork_from: tuple[float, int] | None = None, **trainer_kwargs) -> list[Run]:
    """Train ``model`` at every alpha from the same initial parameters and the same minibatch order.

    Each run lives in ``run_root/alpha=<alpha>``; ``steps`` optionally gives a step count per alpha (the
    lazy run usually needs more). Returns the runs in the order of ``alphas``.

    fork_from=(alpha_source, step): the source run (one of ``alphas``) is trained first and snapshots its
    parameters at ``step``; every other alpha then starts *there* (its ``f_0`` is the model at that step,
    the authors' ``--fork_from``): a regime forked from another run part-way through training.
    """
    runs = {}
    init = copy.deepcopy(model.state_dict())
    order = list(alphas)
    start_from = init
    if fork_from is not None:
        src, at = float(fork_from[0]), int(fork_from[1])
        if src not in [float(a) for a in alphas]:
            raise ValueError(f"fork_from alpha {src:g} is not one of alphas {list(alphas)}")
        if at < 0:
            raise ValueError(f"fork_from step must be >= 0, got {at}")
        order = [a for a in alphas if float(a) == src] + [a for a in alphas if float(a) != src]
    for alpha in order:
        m = copy.deepcopy(model)
        m.load_state_dict(start_from)
        cfg = dataclasses.replace(config, alpha=float(alpha), steps=(steps or {}).get(alpha, config.steps))
        if fork_from is not None and float(alpha) == src:
            if at >= cfg.steps:
                raise ValueError(f"fork_from step {at} is beyond the source run's {cfg.steps} steps")
            cfg = dataclasses.replace(cfg, snapshot_steps=tuple(sorted(set(cfg.snapshot_steps) | {at})))
        run_dir = Path(run_root) / (f"alpha={alpha:g}" if fork_from is None or float(alpha) == src
                                    else f"alpha={alpha:g}-fork{at}")
        t = Trainer(m, train, cfg, run_dir, **trainer_kwargs)
        runs[alpha] = t.fit(resume=resume)
        runs[alpha].name = f"alpha={alpha:g}"  # what analyses key on; the directory says -fork<step>
        if fork_from is not None and float(alpha) == src:
            start_from = torch.load(run_dir / "snapshots" / f"step-{at}.pt", map_location="cpu", weights_only=True)
    return [runs[a] for a in alphas]
