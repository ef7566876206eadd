"""The linearity metrics from any training loop: ``Monitor``, its logging triggers and its sinks.

    mon = Monitor(model_at_init, probe_x, groups={"noisy": (x_noisy, y_noisy)}, every=100)
    for step, (x, y) in enumerate(loader):
        ...  # the user's own training step
        if mon.due(step, loss.item()):
            mon.log(model, step)          # {"sign_similarity": ..., "ntk_alignment": ..., "group/noisy/loss": ...}

The reference's side is captured once (:class:`lazyhasty.metrics.LinearityProbe`, whose ``ntk=`` holds an
:class:`lazyhasty.ntk.NTKReference`): a log runs one no-grad forward of the model for sign similarity and
representation alignment, and forms only the model's tangent kernel. Models run in eval mode on their own
device; their modes are restored.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ._loaders import all_inputs, model_device
from ._modes import measuring

METRICS = ("sign_similarity", "repr_alignment", "ntk_alignment", "ntk_rel_change", "param_distance")
DEFAULT_METRICS = ("sign_similarity", "repr_alignment", "ntk_alignment")


# --- sinks -----------------------------------------------------------------------------------------
class JSONLSink:
    """One JSON object per log, appended, flushed and fsync'd (a crash loses at most the row being written)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")

    def __call__(self, step: int, values: dict) -> None:
        self._f.write(json.dumps({"step": step, **values}) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class CSVSink:
    """A CSV file with a header; the columns are those of the first row (later new keys are an error)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f, self._w, self._keys = None, None, None

    def __call__(self, step: int, values: dict) -> None:
        row = {"step": step, **values}
        if self._w is None:
            exists = self.path.exists() and self.path.stat().st_size > 0
            self._f = open(self.path, "a", newline="")
            self._keys = list(row)
            self._w = csv.DictWriter(self._f, fieldnames=self._keys)
            if not exists:
                self._w.writeheader()
        extra = set(row) - set(self._keys)
        if extra:
            raise ValueError(f"{self.path}: new columns {sorted(extra)} after the header was written")
        self._w.writerow(row)
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


class TensorBoardSink:
    """``torch.utils.tensorboard.SummaryWriter`` scalars, one tag per metric (``log_dir`` or a writer)."""

    def __init__(self, writer_or_dir):
        if isinstance(writer_or_dir, (str, os.PathLike)):
            from torch.utils.tensorboard import SummaryWriter

            writer_or_dir = SummaryWriter(str(writer_or_dir))
        self.writer = writer_or_dir

    def __call__(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()


class WandbSink:
    """``run.log(values, step=step)`` for a Weights & Biases run (``wandb.init(...)``; offline mode works)."""

    def __init__(self, run):
        self.run = run

    def __call__(self, step: int, values: dict) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        pass


def _as_sink(s):
    if isinstance(s, (str, os.PathLike)):
        p = Path(s)
        return CSVSink(p) if p.suffix == ".csv" else JSONLSink(p)
    if callable(s):
        return s
    raise TypeError(f"a sink is a path (.jsonl / .csv), a sink object or a callable(step, values), got {s!r}")


# --- the monitor -----------------------------------------------------------------------------------
def _labelled(data, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    from .data import Dataset

    if isinstance(data, Dataset):
        return data.x, data.y
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    raise TypeError(f"group {name!r} must be a Dataset or an (x, y) pair of tensors")


class Monitor:
    """Linearity metrics and group losses of a model against its reference, whenever a training loop asks.

    reference: the model at init (a module), or an ``AlphaScaled`` / ``Linearized`` model, whose frozen
    initialization is taken (its ``f_0`` stays frozen; alignments are scale-invariant). probe: the examples
    the linearity metrics use (a tensor, a Dataset or a loader). groups: ``{name: Dataset | (x, y)}`` whose
    mean loss (``loss=``) and accuracy are logged as ``group/<name>/loss`` and ``group/<name>/acc``.
    metrics: any of ``sign_similarity``, ``repr_alignment``, ``ntk_alignment``, ``ntk_rel_change``,
    ``param_distance``. every: log when ``step % every == 0``; geometric=q: log when the tracked loss first
    falls below ``L0 q^m`` (m = 1, 2, ...; the paper's logging); both None: every call of ``due`` is due.
    sinks: paths (``.jsonl`` crash-safe JSON lines, ``.csv``), ``TensorBoardSink``, ``WandbSink`` or any
    ``callable(step, values)``.

    process_group: a ``torch.distributed`` group (or ``"world"``), e.g. in a DDP script: each rank passes its
    own shard of ``probe`` and of each group (possibly empty) and every rank gets the values over the
    union (give ``sinks`` on rank 0 only, or every rank writes them).
    ``log(model, step)`` returns a flat dict of floats; the model may be the reference's wrapper
    (``AlphaScaled``: its inner model is measured) or the bare module being trained.
    """

    def __init__(self, reference, probe, *, groups: Mapping | None = None,
                 metrics: Sequence[str] = DEFAULT_METRICS, every: int | None = None, geometric: float | None = None,
                 kernel: str = "trace", loss: str = "cross_entropy", sinks: Sequence = (),
                 batch_size: int = 1024, process_group=None):
        from .regimes import AlphaScaled, Linearized
        from .losses import LOSSES

        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive integer or None, got {every!r}")
        if geometric is not None and not (isinstance(geometric, float) and 0 < geometric < 1):
            raise ValueError(f"geometric must be a float in (0, 1), got {geometric!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if kernel not in ("trace", "full"):
            raise ValueError(f"kernel must be 'trace' or 'full', got {kernel!r}")
        if isinstance(reference, (AlphaScaled, Linearized)):
            from ._loaders import model_and_reference

            inner, reference = model_and_reference(reference, None)
            trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
        elif isinstance(reference, nn.Module):
            trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
        else:
            raise TypeError(f"reference must be the model at init or an AlphaScaled / Linearized model, got "
                            f"{type(reference).__name__}")
        self.metrics, self.every, self.geometric, self.loss = tuple(metrics), every, geometric, loss
        self.reference = reference
        from . import _dist

        self.group = _dist.resolve(process_group)
        if self.group is None:
            x = all_inputs(probe, model_device(reference))
        else:  # this rank's shard, possibly empty
            x = _dist.own_shard(probe, self.group, model_device(reference))
        self.groups = {}
        for name, data in (groups or {}).items():
            gx, gy = _labelled(data, name)
            if gx.shape[0] != gy.shape[0] or (gx.shape[0] == 0 and self.group is None):
                raise ValueError(f"group {name!r}: x has {gx.shape[0]} rows and y {gy.shape[0]} (non-empty, equal)")
            self.groups[name] = (gx, gy)
        from .metrics import LinearityProbe

        want_ntk = {"ntk_alignment", "ntk_rel_change"} & set(metrics)
        need_probe = {"sign_similarity", "repr_alignment"} & set(metrics)
        self.probe = None
        if need_probe or want_ntk:
            self.probe = LinearityProbe.capture(reference, x, batch_size=batch_size,
                                                ntk=kernel if want_ntk else None, trainable=trainable,
                                                process_group=self.group)
            if "sign_similarity" in metrics and self.probe.signs is None:
                raise ValueError("sign_similarity needs ReLUs in the model (nn.ReLU modules or F.relu / torch.relu / "
                                 "clamp(min=0) calls); drop it from metrics=")
        self.theta0 = {n: p.detach().clone() for n, p in reference.named_parameters()} \
            if "param_distance" in metrics else None
        self.sinks = [_as_sink(s) for s in sinks]
        self._L0 = None
        self._next_m = 1

    # -- when ----------------------------------------------------------------------------------------
    def due(self, step: int, loss: float | None = None) -> bool:
        """Whether ``step`` is a logging step: ``every`` steps, or the first step below the next level
        ``L0 q^m`` of the tracked ``loss`` (the first call with a loss sets ``L0`` and is due)."""
        if self.geometric is not None:
            if loss is None:
                raise ValueError("geometric logging needs the tracked loss: mon.due(step, loss)")
            loss = float(loss)
            if not math.isfinite(loss):
                return False
            if self._L0 is None:
                self._L0 = loss
                return True
            if loss < self._L0 * self.geometric ** self._next_m:
                while loss < self._L0 * self.geometric ** self._next_m:
                    self._next_m += 1
                return True
            return False
        if self.every is not None:
            return step % self.every == 0
        return True

    # -- what ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _group_losses(self, model: nn.Module) -> dict:
        from .losses import per_example_loss, predictions_correct

        out, dev = {}, model_device(model)
        for name, (gx, gy) in self.groups.items():
            tot, correct, n = 0.0, 0, 0
            for xb, yb in zip(gx.split(1024), gy.split(1024)):
                o = model(xb.to(dev))
                yb = yb.to(dev)
                tot += float(per_example_loss(self.loss, o, yb).double().sum())
                correct += int(predictions_correct(self.loss, o, yb).sum())
                n += xb.shape[0]
            if self.group is not None:  # sums over every rank's shard of the group
                from . import _dist

                tot, correct, n = _dist.sum_f64(torch.tensor([tot, correct, n], dtype=torch.float64),
                                                self.group).tolist()
                if n == 0:
                    raise ValueError(f"group {name!r} is empty on every rank")
            out[f"group/{name}/loss"] = tot / n
            out[f"group/{name}/acc"] = correct / n
        return out

    def measure(self, model: nn.Module) -> dict:
        """The metrics of ``model`` now (no sink, no trigger)."""
        from .regimes import AlphaScaled, Linearized

        inner = model.model if isinstance(model, (AlphaScaled, Linearized)) else model
        with measuring(model, self.reference):
            return self._measure(model, inner)

    def _measure(self, model: nn.Module, inner: nn.Module) -> dict:
        out: dict = {}
        if self.probe is not None:
            got = self.probe.measure(inner)
            out.update({k: v for k, v in got.items() if k in self.metrics})
        if self.theta0 is not None:
            num = den = 0.0
            for n, p in inner.named_parameters():
                p0 = self.theta0[n].to(p.device)
                num += float((p.detach() - p0).double().pow(2).sum())
                den += float(p0.double().pow(2).sum())
            out["param_distance"] = (num / den) ** 0.5 if den > 0 else float("nan")
        if self.groups:
            out.update(self._group_losses(model))
        return {k: float(v) for k, v in out.items()}

    def log(self, model: nn.Module, step: int) -> dict:
        """Measure, hand the values to every sink, and return them."""
        values = self.measure(model)
        for s in self.sinks:
            s(int(step), values)
        return values

    def close(self) -> None:
        for s in self.sinks:
            if hasattr(s, "close"):
                s.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
