"""Norm layers captured at their norm call: a subclass whose forward is its own (timm's ``BatchNormAct2d``: the
batch norm, then an activation; ``LayerNorm2d``: a permute, ``F.layer_norm``, a permute back).

The module's output is not what its affine parameters multiply, but its forward still calls ``F.batch_norm`` /
``F.layer_norm`` / ``F.group_norm`` / ``F.rms_norm`` with its own ``weight`` and ``bias``: that call computes
``y = xhat * w + b`` elementwise, so the call's input (normalized again without the affine parameters:
:func:`normalized_call_input`) and the gradient at the call's output give the per-example gradients, as for the
base class at its module output. :class:`NormCallRecorder` (a ``TorchFunctionMode`` active only during the module's
own forward: a few operations, not the model's) records each such call's input and output and its other
arguments. The layer check confirms the plan (an affine parameter also used another way fails it and goes to
the fallback, whose stand-ins at operations are in ``broadcast``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .broadcast import NORM_CALLS, _SIGNATURES

# the torch base classes and their norm calls
_BASES = {nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm",
          nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm"}
if hasattr(nn, "RMSNorm"):
    _BASES[nn.RMSNorm] = "rms_norm"


def at_norm_call(m: nn.Module) -> bool:
    """Whether a norm module is captured at its norm call: a subclass of a torch norm whose ``forward`` is not
    the base class's (torch's own norms are captured at their output, with no mode)."""
    base = next((t for t in type(m).__mro__ if t in _BASES), None)
    return base is not None and type(m).forward is not base.forward


class NormCallRecorder(TorchFunctionMode):
    """While active (the module's forward), records each norm call whose ``weight`` or ``bias`` is the module's
    own into ``calls`` (a :class:`~.captured.Calls`: input, output, version counters for in-place safety, and in
    ``call_args`` the call's function and its other arguments); hands the model a copy of the output when the
    plan asks for one (``copy_output``)."""

    def __init__(self, plan, calls):
        super().__init__()
        self.plan = plan
        self.calls = calls
        m = plan.module
        self._own = [t for t in (m._parameters.get("weight"), m._parameters.get("bias")) if t is not None]
        self.recorded = 0  # norm calls recorded while active

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in NORM_CALLS:
            return out
        try:
            a = _SIGNATURES[func].bind(*args, **kwargs).arguments
        except TypeError:
            return out
        if not any(a.get(k) is t for k in ("weight", "bias") for t in self._own):
            return out
        self.calls.record(self.plan, a["input"], out)
        self.calls.call_args.append((func, {k: v for k, v in a.items() if k not in ("input", "weight", "bias")}))
        self.recorded += 1
        return self.calls.hand_on(self.plan, out)


def normalized_call_input(func, args: dict, x: torch.Tensor) -> torch.Tensor:
    """The recorded norm call on ``x`` without its affine parameters: ``xhat``, what the weight multiplies (a
    batch norm in training mode normalizes by the batch statistics, without touching the running ones)."""
    args = dict(args)
    if func is torch.nn.functional.batch_norm and args.get("training"):
        args["running_mean"] = args["running_var"] = None
    return func(x, **args)


def call_reduction(func, args: dict, gk: torch.Tensor) -> tuple:
    """The dims of a ``[b, k, ...]`` gradient at the call's output summed for its affine parameters: the
    positions before the trailing ``normalized_shape`` (layer / RMS norm), or all after the channels
    (batch / group norm)."""
    if NORM_CALLS[func] == "channel":
        return tuple(range(3, gk.dim()))
    ns = args.get("normalized_shape")
    n = len(ns) if isinstance(ns, (tuple, list, torch.Size)) else 1
    return tuple(range(2, gk.dim() - n))
