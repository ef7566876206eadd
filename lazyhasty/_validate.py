"""The checks every NTK entry point runs on its model(s) and inputs before any kernel work, in one place.

`ntk_gram`, `ntk_alignment`, `explain`, `KernelOperator`, `ntk_eigh` / `kernel_matvec` and `NTKReference` call
[`check_model_inputs`][lazyhasty._validate.check_model_inputs] once the inputs are gathered, so that a bad
input is an error naming the argument and what was expected, not torch's message from deep inside the engine
and never a silent wrong number. (The checks that depend on the engine's blocks, batch mixing and non-finite
values, stay in `ntk.capture.mixing.check_probe_inputs`.)
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ._loaders import check_materialized, model_device, model_dtype, run_model
from ._modes import measuring

SAMPLE = 3  # examples of the trial forward: enough to tell one row per example from a batch-summed output
# model -> {trial key: the nn.Embedding modules that read the raw inputs}: a trial forward that passed for this
# structure, these modes and this input signature is not run again (a later call on a 12-model benchmark spent
# 18% of its time in it: timm's efficientnet, 15 of 82 ms); the raw ids are still range-checked on every call.
# One of the per-model caches that lazyhasty.ntk.capture.caches.forget drops.
TRIAL_PASSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def check_module(model, name: str = "model", trainable: bool = True) -> None:
    """Raise ``TypeError`` unless ``model`` (the argument ``name``) is an ``nn.Module``; ``ValueError`` when it
    holds tensors on the meta device or, with ``trainable``, has no trainable parameter (its tangent kernel
    would be zero)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
    check_materialized(model, name)
    if trainable and not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{name} has no trainable parameter (requires_grad=True): its NTK is zero")


def _check_ids(ids: torch.Tensor, module: nn.Embedding, mname: str, name: str) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= module.num_embeddings:
        raise ValueError(f"token id {lo if lo < 0 else hi} is out of range of {name}'s nn.Embedding {mname!r} "
                         f"(num_embeddings={module.num_embeddings}): ids must be in [0, {module.num_embeddings})")


def _embedding_ranges(model: nn.Module, x: torch.Tensor, name: str) -> list:
    """Forward pre-hooks on ``model``'s ``nn.Embedding`` modules that refuse ids outside ``[0, num_embeddings)``,
    naming the module; each records whether it read the raw inputs ``x`` (then all of ``x`` is checked)."""
    handles, direct = [], []

    def hook(module, args, mname=None):
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor) or ids.numel() == 0:
            return
        if ids.is_floating_point():
            raise ValueError(f"{name}'s nn.Embedding {mname!r} got {ids.dtype} inputs: token ids are integers "
                             "(pass x.long()), or pass floating-point inputs to a model that does not embed them")
        _check_ids(ids, module, mname, name)
        if ids.shape == x.shape and torch.equal(ids, x):
            direct.append((mname, module))

    for mname, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            handles.append(module.register_forward_pre_hook(lambda m, a, mname=mname: hook(m, a, mname)))
    return handles, direct


def _run(model: nn.Module, xs: torch.Tensor, x: torch.Tensor, name: str):
    try:
        return run_model(model, xs, name)  # integer inputs to a floating-point model: named there
    except (RuntimeError, IndexError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{name} cannot run on the inputs (examples of shape {_shape(x[0])}, {x.dtype}; "
                         f"{type(exc).__name__}: {msg}): check the input shape and dtype {name} expects") from exc


def _check_rows(out, b: int, name: str) -> bool:
    """Whether ``out`` is a tensor (False: a tuple / dict / ModelOutput, for the engine to name ``output=``);
    an error unless it has one row per example of the batch of ``b``."""
    if not isinstance(out, torch.Tensor):
        return False
    if out.dim() == 0:
        raise ValueError(f"{name} returns a scalar (shape []) for a batch of {b} examples, e.g. a loss summed "
                         "over the batch: the tangent kernel needs one output row per example, [n] or [n, k]")
    if out.shape[0] != b:
        raise ValueError(f"{name} returns {out.shape[0]} rows (output {_shape(out)}) for a batch of {b} examples "
                         "(an output summed or reshaped over the batch, or without a batch dimension): the tangent "
                         "kernel needs one output row per example, [n] or [n, k]")
    return True


def _trial_key(model: nn.Module, x: torch.Tensor) -> tuple:
    """What a trial forward's outcome depends on: the modules (names, types, modes), the parameters (names,
    shapes, dtypes, devices, which are trainable) and the inputs' example shape, dtype and device."""
    return (tuple((n, type(m), m.training) for n, m in model.named_modules()),
            tuple((n, tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()),
            tuple(x.shape[1:]), x.dtype, x.device, x.shape[0] >= SAMPLE)


def _trial_forward(model: nn.Module, x: torch.Tensor, name: str) -> None:
    """Forwards of the first examples (``SAMPLE`` and one fewer), with grad, in eval mode (modes, buffers and
    RNG restored): torch's errors made to name the inputs, then the output checked to be one differentiable row
    per example. Once passed for a model's structure, modes and input signature, later calls only range-check
    the ids that embeddings read as they are."""
    try:
        key = _trial_key(model, x)
        passed = TRIAL_PASSED.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: checked every time
        key, passed = None, {}
    if key in passed:
        for mname, module in passed[key]:
            _check_ids(x, module, mname, name)
        return
    xs = x[:SAMPLE].to(model_device(model))
    dtype = model_dtype(model)
    if xs.is_floating_point() and dtype is not None:
        xs = xs.to(dtype)  # what the engine feeds the model
    handles, direct = _embedding_ranges(model, xs, name)
    try:
        with measuring(model), torch.enable_grad():
            out = _run(model, xs, x, name)
            if _check_rows(out, xs.shape[0], name) and xs.shape[0] > 1:
                _check_rows(_run(model, xs[:-1], x, name), xs.shape[0] - 1, name)  # rows follow the batch
    finally:
        for h in handles:
            h.remove()
    for mname, module in direct:  # ids read as they are: every example's, not only the trial's
        _check_ids(x, module, mname, name)
    if isinstance(out, torch.Tensor):
        if not out.is_floating_point() and not out.is_complex():
            raise ValueError(f"{name}'s output is {out.dtype}: the tangent kernel needs a floating-point output "
                             "(a rounded or argmax output has no gradient)")
        if not out.requires_grad:
            raise ValueError(f"{name}'s output does not depend on its trainable parameters (no gradient reaches it: "
                             "a detach(), torch.no_grad() or frozen path in forward): its NTK is zero")
    if key is not None:
        if len(passed) > 16:  # a bounded record (input signatures vary little within a run)
            passed.clear()
        passed[key] = list(direct)


def check_model_inputs(x, **models) -> None:
    """Check each model (by its argument name) and the inputs ``x`` ``[n, ...]`` of an NTK call.

    Args:
        x: the gathered inputs ``[n, ...]`` (None: only that each model is an ``nn.Module``, before the inputs
            are read).
        **models: the modules, by argument name, e.g. ``model=model, reference=ref``.

    Raises:
        TypeError: a model that is not an ``nn.Module``, inputs that are not a tensor.
        ValueError: a model with tensors on the meta device; a model without trainable parameters; inputs
            without a batch dimension or with no example;
            token ids out of an ``nn.Embedding``'s range (naming it); integer inputs to a floating-point model;
            inputs of a shape the model cannot take; an output that is a scalar, has another number of rows
            than the batch, is not floating-point or does not depend on the parameters.

    Example:
        >>> check_model_inputs(torch.randn(4, 3), model=torch.nn.Linear(3, 2))   # nothing to say
        >>> check_model_inputs(torch.randn(4, 5), model=torch.nn.Linear(3, 2))
        Traceback (most recent call last):
        ValueError: model cannot run on the inputs (examples of shape [5], torch.float32; RuntimeError: ...
    """
    for name, model in models.items():
        check_module(model, name, trainable=x is not None)
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"the inputs must be a tensor [n, ...], got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("the inputs must have a batch dimension [n, ...], got a 0-d tensor")
    if x.shape[0] == 0:
        raise ValueError("the inputs hold no example ([0, ...]): the kernel of an empty set is not defined")
    for name, model in models.items():
        _trial_forward(model, x, name)
