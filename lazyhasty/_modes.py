"""What every probe measures: the network in eval mode, with the training state left exactly as it was.

A probe inside a training loop meets models in train mode (dropout active, BatchNorm on batch statistics).
Dropout makes the network random and BatchNorm in train mode makes each example's output depend on the rest
of its batch, so neither has a tangent kernel, a sign pattern or a representation of its own; the
deterministic network the probes are about is the model in eval mode (dropout off, BatchNorm on its running
statistics). `measuring` puts the models in that mode for the measurement and afterwards restores,
bit for bit, what training depends on: each module's ``training`` flag, each buffer (BatchNorm's running
statistics and counters included, even when a module replaced a buffer object instead of writing into it)
and the random number generators of the CPU and of the models' CUDA devices, so a step after a probe is the
step that would have run without it.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["measures", "measuring"]


def _unique_modules(models) -> list[nn.Module]:
    seen, out = set(), []
    for model in models:
        if model is None:
            continue
        if not isinstance(model, nn.Module):
            raise TypeError(f"measuring() takes nn.Module objects, got {type(model).__name__}")
        for m in model.modules():
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


def _saved_buffers(modules: list[nn.Module]) -> list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]:
    """``(module, name, the buffer object, a copy of its values)`` for every buffer a probe could change."""
    saved = []
    for m in modules:
        for name, buf in m._buffers.items():
            if buf is None or buf.device.type == "meta":
                continue
            saved.append((m, name, buf, buf.detach().clone()))
    return saved


def _restore_buffers(saved) -> None:
    with torch.no_grad():
        for m, name, buf, copy in saved:
            if m._buffers.get(name) is not buf:  # the module assigned a new tensor: put the original back
                m._buffers[name] = buf
            # write only what changed: an unchanged buffer keeps its version counter, so a training graph still
            # pending through it (a backward not yet run) stays valid
            if buf.shape != copy.shape or buf.dtype != copy.dtype:
                buf.data = copy
            elif not _bitwise_equal(buf, copy):
                buf.copy_(copy)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point() or a.is_complex():  # NaN payloads and -0.0 compare by their bits
        try:
            return torch.equal(a.detach().contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
        except RuntimeError:
            pass
    return torch.equal(a.detach(), b)


def _cuda_devices(modules: list[nn.Module]) -> list[int]:
    devices = set()
    for m in modules:
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None and t.device.type == "cuda":
                devices.add(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return sorted(devices)


@contextlib.contextmanager
def measuring(*models: nn.Module | None) -> Iterator[None]:
    """Run ``models`` in eval mode and restore every module's mode, every buffer and the RNG states after.

    Args:
        *models: the modules a probe runs (the model, its reference; ``None`` entries are skipped; shared
            modules and one object given twice are handled once).

    The restore is bit for bit whatever happens inside (an exception included): ``training`` of each module as
    it was (a mix of train and eval submodules stays that mix), each buffer's values (and its object, if a
    module swapped it), and the torch RNG of the CPU and of every CUDA device the models live on.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).train()
        >>> with measuring(net):
        ...     assert not net.training          # dropout off, BatchNorm on its running statistics
        >>> net.training
        True
    """
    modules = _unique_modules(models)
    modes = [(m, m.training) for m in modules]
    saved = _saved_buffers(modules)
    devices = _cuda_devices(modules)
    try:
        with torch.random.fork_rng(devices=devices, enabled=True):
            for model in models:
                if model is not None:
                    model.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        _restore_buffers(saved)


def measures(*arguments: str):
    """Decorate a function so that it runs under `measuring` of the modules named in ``arguments``.

    Args:
        *arguments: parameter names of the decorated function (``"model"``), or attribute paths from one
            (``"self.reference"``); a value that is not a module (``None``, a state_dict) is skipped.

    Returns:
        The decorator.

    Example:
        >>> @measures("model", "reference")
        ... def probe(model, loader, reference=None): ...
    """
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            modules = []
            for path in arguments:
                head, *rest = path.split(".")
                value = bound.get(head)
                for attr in rest:
                    value = getattr(value, attr, None)
                if isinstance(value, nn.Module):
                    modules.append(value)
            with measuring(*modules):
                return fn(*args, **kwargs)
        return wrapper
    return decorate
