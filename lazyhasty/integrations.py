"""A [`Monitor`][lazyhasty.monitor.Monitor] inside the trainers people use: Lightning and Hugging Face ``transformers``.

Each is imported lazily (``pip install lightning`` / ``transformers accelerate``); nothing here is needed otherwise.
The callbacks are classes, importable where their library is installed:

    from lazyhasty.integrations import LazyhastyCallback           # Lightning
    L.Trainer(callbacks=[LazyhastyCallback(Monitor(net_at_init, probe_x), every_n_steps=50)], ...)

    from lazyhasty.integrations import LazyhastyTrainerCallback    # Hugging Face
    transformers.Trainer(..., callbacks=[LazyhastyTrainerCallback(Monitor(model_at_init, probe_batch))])

Lightning: the values go through ``pl_module.log_dict`` (``trainer.callback_metrics``, so ``EarlyStopping`` /
``ModelCheckpoint`` can monitor them, and the progress bar with ``prog_bar=True``) and to every logger in
``Trainer(logger=[...])`` at the step they were measured (whatever ``log_every_n_steps`` is). Hugging Face:
through ``Trainer.log`` (``state.log_history`` and every ``report_to`` integration). Both measure the model in
eval mode and leave its training state untouched (the Monitor's rule).

The model measured: ``get_model(module)`` when given; by default the module, or the first of its submodules,
whose parameters are the Monitor reference's (an ``AlphaScaled`` / ``Linearized`` wrapper of it counts), found
once, after unwrapping DDP / ``torch.compile`` / accelerate wrappers.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from torch import nn

from .monitor import Monitor

# the two callback classes are built on first access (module __getattr__), only when Lightning / transformers import
__all__ = ["LazyhastyCallback", "LazyhastyTrainerCallback", "lightning_callback", "transformers_callback"]  # noqa: F822


def unwrap_model(model: nn.Module) -> nn.Module:
    """`model` without its distributed / compiled wrappers.

    DDP, DataParallel, `torch.compile`, accelerate's and DeepSpeed's engines: whatever keeps the trained
    module as `.module` or `._orig_mod` is peeled off, repeatedly.

    Args:
        model: the module, wrapped or not.

    Returns:
        The innermost trained module (`model` itself when it is not wrapped).

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DeepSpeedEngine", "FullyShardedDataParallel") and isinstance(
                getattr(model, "module", None), nn.Module):
            model = model.module
    return model


def _signature(module: nn.Module) -> dict:
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


def _measured_module(root: nn.Module, monitor: Monitor) -> nn.Module:
    """The module of ``root`` whose parameters are the reference's (itself, a submodule, or the inner model of an
    AlphaScaled / Linearized submodule)."""
    from .regimes import AlphaScaled, Linearized

    want = _signature(monitor.reference)
    for _, m in root.named_modules():
        inner = m.model if isinstance(m, (AlphaScaled, Linearized)) else m
        if _signature(inner) == want:
            return m
    raise ValueError(f"no module of the {type(root).__name__} has the parameters of the Monitor's reference "
                     f"({len(want)} tensors, e.g. {list(want)[:3]}): pass get_model= (e.g. lambda m: m.net)")


class _Schedule:
    """The callbacks' own cadence (``every_n_steps`` / ``geometric``), when given instead of the Monitor's; the
    Monitor's ``budget`` still applies (through ``due``)."""

    def __init__(self, monitor: Monitor, every_n_steps: int | None, geometric: float | None):
        if every_n_steps is not None and geometric is not None:
            raise ValueError("give every_n_steps or geometric, not both")
        if every_n_steps is not None or geometric is not None:
            if monitor.every is not None or monitor.geometric is not None:
                raise ValueError(f"the Monitor already logs with every={monitor.every}, geometric={monitor.geometric}:"
                                 " give the cadence to the Monitor or to the callback, not both")
            monitor.schedule(every=every_n_steps, geometric=geometric)
        self.monitor = monitor

    def due(self, step: int, loss) -> bool:
        if self.monitor.geometric is not None and loss is None:  # no loss this batch (manual optimization)
            return self.monitor.due(step, math.nan)
        return self.monitor.due(step, loss)


def _as_float(loss) -> float | None:
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().float().mean()) if loss.numel() else None
    return float(loss)


def _lightning_classes():
    try:
        from lightning.pytorch import Callback
        from lightning.pytorch.utilities import rank_zero_only  # noqa: F401
    except ImportError:  # the older package name
        try:
            from pytorch_lightning import Callback
        except ImportError as exc:
            raise ImportError("LazyhastyCallback needs Lightning: pip install lightning") from exc
    return Callback


def _make_lightning_callback():
    Callback = _lightning_classes()

    class LazyhastyCallback(Callback):
        """Log a [`Monitor`][lazyhasty.monitor.Monitor]'s values through Lightning after training batches.

        Args:
            monitor: the Monitor (its reference captured at init), or a function of no arguments returning one,
                called at the Trainer's ``setup`` (for a ``process_group`` Monitor, which needs the process group).
            get_model: maps the LightningModule to the module measured; default: found by parameter names.
            every_n_steps: log when ``trainer.global_step % every_n_steps == 0`` (instead of the Monitor's own
                cadence; give one of the two).
            geometric: log when the training loss first falls below ``L0 q^m`` (the paper's logging).
            loss_key: the key of the loss in ``training_step``'s output dict (a bare tensor output is the loss).
            prog_bar: also show the values in the progress bar. Default False.
            prefix: prepended to every logged name, e.g. ``"lazyhasty/"``. Default ``""``.

        The step is ``trainer.global_step`` (optimizer steps taken). Over several processes (``strategy="ddp"``
        / ``"ddp_spawn"``): a Monitor without a ``process_group`` is measured on rank 0 (its whole probe set) and
        its values broadcast; a Monitor with one (built after the process group exists: pass ``monitor`` as a
        function, e.g. ``lambda: Monitor(init, my_shard, process_group="world")``, called at ``setup``) is
        measured on every rank, each its shard. Either way every rank gets the same values in
        ``callback_metrics`` (so ``EarlyStopping`` decides alike everywhere), while the loggers and the
        Monitor's sinks are written on global rank 0 only. A measurement that raises on rank 0 raises on every
        rank, naming it, instead of leaving the others waiting. ``logged``: ``[(step, values)]`` of this process.

        Example:
            >>> cb = LazyhastyCallback(Monitor(net_at_init, probe_x), every_n_steps=50, prog_bar=True)
            >>> L.Trainer(callbacks=[cb], strategy="ddp", devices=2).fit(module, loader)
        """

        def __init__(self, monitor: Monitor | Callable[[], Monitor], *, get_model: Callable | None = None,
                     every_n_steps: int | None = None, geometric: float | None = None, loss_key: str = "loss",
                     prog_bar: bool = False, prefix: str = ""):
            super().__init__()
            if not isinstance(monitor, Monitor) and not callable(monitor):
                raise TypeError("monitor must be a lazyhasty.Monitor or a function returning one (built at setup), "
                                f"got {type(monitor).__name__}")
            if every_n_steps is not None and geometric is not None:
                raise ValueError("give every_n_steps or geometric, not both")
            self.get_model, self.loss_key = get_model, loss_key
            self.prog_bar, self.prefix = bool(prog_bar), str(prefix)
            self._cadence = (every_n_steps, geometric)
            self.monitor, self._make_monitor, self.schedule = None, None, None
            if isinstance(monitor, Monitor):
                self._use(monitor)
            else:
                self._make_monitor = monitor
            self.logged: list[tuple[int, dict]] = []
            self._measured = None

        def _use(self, monitor):
            if not isinstance(monitor, Monitor):
                raise TypeError(f"the monitor function must return a lazyhasty.Monitor, got {type(monitor).__name__}")
            self.monitor = monitor
            self.schedule = _Schedule(monitor, *self._cadence)

        def setup(self, trainer, pl_module, stage):
            if self.monitor is None:  # after the process group exists: a process_group Monitor can be built
                self._use(self._make_monitor())

        def _model(self, pl_module):
            if self.get_model is not None:
                return self.get_model(pl_module)
            if self._measured is None:
                self._measured = _measured_module(unwrap_model(pl_module), self.monitor)
            return self._measured

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = int(trainer.global_step)
            loss = outputs.get(self.loss_key) if isinstance(outputs, dict) else outputs
            loss = _as_float(loss)
            many = trainer.world_size > 1
            grouped = self.monitor.group is not None
            if many and not grouped:
                due = trainer.strategy.broadcast(self.schedule.due(step, loss) if trainer.is_global_zero else None,
                                                 src=0)
            else:
                due = self.schedule.due(step, loss)  # a group monitor agrees on it over its group
            if not due:
                return
            if many and not grouped:
                values = None
                if trainer.is_global_zero:
                    try:
                        values = self.monitor.log(self._model(pl_module), step)
                    except Exception as exc:  # the others are waiting in the broadcast: tell them, then raise
                        trainer.strategy.broadcast(("failed", f"{type(exc).__name__}: {exc}"), src=0)
                        raise
                values = trainer.strategy.broadcast(("ok", values), src=0)
                if values[0] == "failed":
                    raise RuntimeError(f"LazyhastyCallback: the Monitor's measurement at step {step} raised on rank "
                                       f"0: {values[1]}")
                values = values[1]
            else:  # a group Monitor: every rank measures its shard; only rank 0 writes the sinks
                from . import _dist

                with _dist.failing_together(self.monitor.group, "LazyhastyCallback"):  # get_model included
                    values = self.monitor.log(self._model(pl_module), step, write=trainer.is_global_zero)
            self.logged.append((step, values))
            named = {self.prefix + k: float(v) for k, v in values.items()}
            # callback_metrics (EarlyStopping, ModelCheckpoint) and the progress bar through Lightning's own
            # logging; the loggers directly, at this step: Lightning writes self.log values to them only every
            # log_every_n_steps steps (default 50), which would drop most logs
            pl_module.log_dict(named, on_step=True, on_epoch=False, prog_bar=self.prog_bar, logger=False,
                               batch_size=1, sync_dist=False)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(named, step=step)

    return _importable(LazyhastyCallback)


def _importable(cls):
    """``cls`` under its public name, so that pickle finds it (``ddp_spawn`` pickles the Trainer's callbacks)."""
    cls.__qualname__, cls.__module__ = cls.__name__, __name__
    return cls


def _make_transformers_callback():
    try:
        from transformers import Trainer, TrainerCallback
    except ImportError as exc:
        raise ImportError("LazyhastyTrainerCallback needs transformers: pip install transformers accelerate") from exc

    class LazyhastyTrainerCallback(TrainerCallback):
        """Log a [`Monitor`][lazyhasty.monitor.Monitor]'s values through a Hugging Face ``Trainer``'s own logging.

        Args:
            monitor: the Monitor (its reference captured at init; a tokenized dict of tensors works as its probe).
            get_model: maps the Trainer's model (unwrapped) to the module measured; default: found by parameter
                names.
            every_n_steps: log at ``on_step_end`` when ``state.global_step % every_n_steps == 0`` (instead of the
                Monitor's own cadence).
            geometric: log at ``on_log`` when the training loss the Trainer reports first falls below
                ``L0 q^m`` (set ``logging_steps`` accordingly).
            trainer: the Trainer; default: the one that calls ``on_train_begin``.

        The values go through ``trainer.log`` (so ``state.log_history`` and every ``report_to`` integration get
        them, on the process that logs: the Trainer's world process zero) and to the Monitor's own sinks (on
        that process only: under ``torchrun`` every process measures, one writes).
        ``logged``: ``[(step, values)]``.
        """

        def __init__(self, monitor: Monitor, *, get_model: Callable | None = None, every_n_steps: int | None = None,
                     geometric: float | None = None, trainer=None):
            if not isinstance(monitor, Monitor):
                raise TypeError(f"monitor must be a lazyhasty.Monitor, got {type(monitor).__name__}")
            self.monitor, self.get_model, self.trainer = monitor, get_model, trainer
            self.schedule = _Schedule(monitor, every_n_steps, geometric)
            self.logged: list[tuple[int, dict]] = []
            self._measured = None
            self._logging = False

        def _model(self, model):
            model = unwrap_model(model)
            if self.get_model is not None:
                return self.get_model(model)
            if self._measured is None:
                self._measured = _measured_module(model, self.monitor)
            return self._measured

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if self.trainer is None:  # the Trainer calling us: its log() is how values reach its integrations
                frame = sys._getframe(1)
                while frame is not None and not isinstance(frame.f_locals.get("self"), Trainer):
                    frame = frame.f_back
                if frame is None:
                    raise RuntimeError("LazyhastyTrainerCallback could not find its Trainer: pass trainer=")
                self.trainer = frame.f_locals["self"]

        def _log(self, state, model):
            step = int(state.global_step)
            # every process measures (the same values); the Monitor's sinks are written by the one that logs
            values = self.monitor.log(self._model(model), step, write=bool(getattr(state, "is_world_process_zero",
                                                                                     True)))
            self.logged.append((step, values))
            self._logging = True
            try:
                self.trainer.log(dict(values))
            finally:
                self._logging = False

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.monitor.geometric is None and self.schedule.due(int(state.global_step), None):
                self._log(state, model)

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if self._logging or self.monitor.geometric is None or not logs or "loss" not in logs:
                return
            if self.schedule.due(int(state.global_step), float(logs["loss"])):
                self._log(state, model)

    return _importable(LazyhastyTrainerCallback)


_BUILT: dict = {}


def __getattr__(name):  # the classes need their library, so they are built on first use
    makers = {"LazyhastyCallback": _make_lightning_callback, "LazyhastyTrainerCallback": _make_transformers_callback}
    if name in makers:
        if name not in _BUILT:
            _BUILT[name] = makers[name]()
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lightning_callback(monitor: Monitor, *, get_model: Callable | None = None, loss_key: str = "loss", **options):
    """A `LazyhastyCallback` for Lightning (kept for earlier code).

    Args:
        monitor: the [Monitor][lazyhasty.monitor.Monitor] (its reference captured at init).
        get_model: maps the LightningModule to the module measured; default: found by parameter names.
        loss_key: the key of the loss in `training_step`'s output dict.
        **options: the callback's other keyword arguments (`every_n_steps`, `geometric`, `prog_bar`, `prefix`).

    Returns:
        The `lazyhasty.integrations.LazyhastyCallback`.

    Raises:
        ImportError: Lightning is not installed (`pip install lightning`).
    """
    return __getattr__("LazyhastyCallback")(monitor, get_model=get_model, loss_key=loss_key, **options)


def transformers_callback(monitor: Monitor, *, get_model: Callable | None = None, **options):
    """A `LazyhastyTrainerCallback` for the Hugging Face `Trainer` (kept for earlier code).

    Args:
        monitor: the [Monitor][lazyhasty.monitor.Monitor] (its reference captured at init).
        get_model: maps the Trainer's model (unwrapped) to the module measured; default: found by parameter
            names.
        **options: the callback's other keyword arguments (`every_n_steps`, `geometric`, `trainer`).

    Returns:
        The `lazyhasty.integrations.LazyhastyTrainerCallback`.

    Raises:
        ImportError: transformers is not installed (`pip install transformers accelerate`).
    """
    return __getattr__("LazyhastyTrainerCallback")(monitor, get_model=get_model, **options)
