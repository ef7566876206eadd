"""A :class:`lazyhasty.Monitor` inside the trainers people use: Lightning and Hugging Face ``transformers``.

Each is imported lazily (``pip install lightning`` / ``transformers``); nothing here is needed otherwise.

    cb = lightning_callback(Monitor(net_at_init, probe_x, every=50), get_model=lambda m: m.net)
    L.Trainer(callbacks=[cb], ...)                      # logs to the monitor's sinks and to trainer.logger

    cb = transformers_callback(Monitor(net_at_init, probe_x, every=50), get_model=lambda m: m.net)
    transformers.Trainer(..., callbacks=[cb])           # logs to the monitor's sinks and the trainer's log history

``get_model`` maps the framework's module to the one the monitor measures (the module whose names match
the reference's); the default is the module itself. Only the global-zero process logs.
"""
from __future__ import annotations

from collections.abc import Callable

from .monitor import Monitor


def _identity(m):
    return m


def lightning_callback(monitor: Monitor, *, get_model: Callable = _identity, loss_key: str = "loss"):
    """A ``lightning.pytorch.Callback`` that calls ``monitor.due`` / ``monitor.log`` after each training batch
    (step = ``trainer.global_step``, loss = the batch's ``outputs[loss_key]``) and forwards the values to
    ``trainer.logger``."""
    try:
        from lightning.pytorch import Callback
    except ImportError:  # the older package name
        try:
            from pytorch_lightning import Callback
        except ImportError as exc:
            raise ImportError("lightning_callback needs Lightning: pip install lightning") from exc

    class LazyhastyMonitorCallback(Callback):
        def __init__(self):
            self.monitor, self.get_model, self.loss_key = monitor, get_model, loss_key
            self.logged: list[tuple[int, dict]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not trainer.is_global_zero:
                return
            step = int(trainer.global_step)
            loss = outputs.get(self.loss_key) if isinstance(outputs, dict) else outputs
            loss = None if loss is None else float(loss.detach() if hasattr(loss, "detach") else loss)
            if self.monitor.due(step, loss):
                values = self.monitor.log(self.get_model(pl_module), step)
                self.logged.append((step, values))
                if trainer.logger is not None:
                    trainer.logger.log_metrics(values, step=step)

    return LazyhastyMonitorCallback()


def transformers_callback(monitor: Monitor, *, get_model: Callable = _identity):
    """A ``transformers.TrainerCallback``: with ``every=`` it logs at ``on_step_end``; with ``geometric=``
    at ``on_log``, where the trainer reports its training loss (set ``logging_steps`` accordingly). The
    values go to the monitor's sinks and into ``state.log_history``."""
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError("transformers_callback needs transformers: pip install transformers") from exc

    class LazyhastyMonitorCallback(TrainerCallback):
        def __init__(self):
            self.monitor, self.get_model = monitor, get_model
            self.logged: list[tuple[int, dict]] = []

        def _log(self, state, model):
            values = self.monitor.log(self.get_model(model), int(state.global_step))
            self.logged.append((int(state.global_step), values))
            state.log_history.append({**values, "step": int(state.global_step)})

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and self.monitor.geometric is None and self.monitor.due(state.global_step):
                self._log(state, model)

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if (state.is_world_process_zero and self.monitor.geometric is not None and logs
                    and "loss" in logs and self.monitor.due(state.global_step, logs["loss"])):
                self._log(state, model)

    return LazyhastyMonitorCallback()
