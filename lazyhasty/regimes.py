"""Training regimes from one initialization: alpha-scaled models and the exact linearization.

``AlphaScaled(model, alpha)`` computes ``f_0(x) + alpha (f(x) - f_0(x))`` (paper eq. 4) and is trained with
``scaled_lr(lr, alpha) = lr / alpha^2``: alpha = 1 is standard training, alpha = 100 lazy, alpha < 1
extra adaptive. ``center=True`` gives ``alpha (f(x) - f_0(x))``, the form the authors' code trained.
``Linearized(model)`` is the exact first-order Taylor model around the parameters at wrap time
(the alpha -> infinity reference).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def scaled_lr(lr: float, alpha: float) -> float:
    """``lr / alpha^2``: keeps the first-order change of ``f_alpha`` per step independent of alpha."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return lr / alpha**2


class AlphaScaled(nn.Module):
    """``f_alpha(x) = f_0(x) + alpha (f(x) - f_0(x))`` (or ``alpha (f(x) - f_0(x))`` with ``center=True``).

    ``at=state_dict``: expand around a checkpoint ``theta_t`` instead (the model is loaded with it first, and
    ``f_0`` is the model there): fork a run at step t into another regime.

    ``.model`` is the trainable inner module; ``f_0`` is a frozen copy taken at wrap time: no grad,
    same device (moves with ``.to``), saved in ``state_dict`` under ``f0.`` but excluded from
    ``parameters()``, and always run in eval mode (its dropout and BatchNorm statistics never change).

        >>> lazy = AlphaScaled(net, 100.0)
        >>> opt = torch.optim.SGD(lazy.parameters(), lr=scaled_lr(0.1, 100.0))
    """

    def __init__(self, model: nn.Module, alpha: float, *, center: bool = False, at=None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if at is not None:
            # fork from a checkpoint theta_t (the authors' --fork_from): the model starts there and f_0 is it
            if isinstance(at, nn.Module):
                at = at.state_dict()
            if not isinstance(at, dict):
                raise TypeError(f"at= must be a state_dict (or a module) of the model, got {type(at).__name__}")
            sd = {k[len("model."):]: v for k, v in at.items() if k.startswith("model.")} if any(
                k.startswith("model.") for k in at) else at  # an AlphaScaled state_dict works too
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ValueError(f"at= does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        alpha = float(alpha)
        if not alpha > 0 or alpha != alpha or alpha == float("inf"):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        self.model = model
        self.f0 = copy.deepcopy(model).requires_grad_(False).eval()
        self.alpha = alpha
        self.center = bool(center)
        self._f0_cache = None  # (x, x._version, f0(x)): full-batch GD feeds the same tensor every step

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            if not name[len(prefix):].lstrip(".").startswith("f0."):
                yield name, p

    def train(self, mode: bool = True):
        super().train(mode)
        self.f0.eval()
        return self

    def load_state_dict(self, *args, **kwargs):
        self._f0_cache = None
        return super().load_state_dict(*args, **kwargs)

    def _f0_of(self, args, kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            x = args[0]
            c = self._f0_cache
            # identity + version: the cache holds x itself (its memory cannot be reused) and notices in-place edits
            if c is not None and c[0] is x and c[1] == x._version:
                return c[2]
            with torch.no_grad():
                out = self.f0(x)
            self._f0_cache = (x, x._version, out)
            return out
        with torch.no_grad():
            return self.f0(*args, **kwargs)

    def forward(self, *args, **kwargs):
        f = self.model(*args, **kwargs)
        f0 = self._f0_of(args, kwargs)
        if self.center:
            return self.alpha * (f - f0)
        return f0 + self.alpha * (f - f0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, center={self.center}"


class _Frozen(nn.Module):
    """Holds the expansion point as buffers (in state_dict, moved by .to, not parameters)."""


class Linearized(nn.Module):
    """Exact first-order Taylor model ``f(x; theta0) + J(x; theta0) (theta - theta0)`` (torch.func.jvp).

    Its parameters are the wrapped model's own (same order); ``theta0`` is a frozen copy taken at wrap
    time. Buffers (e.g. BatchNorm statistics) are read from the model. One forward costs about two
    forwards of the model (a forward-mode JVP).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.theta0 = _Frozen()
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self._names:
            raise ValueError("the model has no trainable parameter to linearize")
        for i, n in enumerate(self._names):
            self.theta0.register_buffer(f"p{i}", dict(model.named_parameters())[n].detach().clone())

    def forward(self, x):
        from torch.func import functional_call, jvp

        params = dict(self.model.named_parameters())
        theta0 = {n: getattr(self.theta0, f"p{i}") for i, n in enumerate(self._names)}
        delta = {n: params[n] - theta0[n] for n in self._names}

        def f(p):
            return functional_call(self.model, p, (x,))

        out0, tangent = jvp(f, (theta0,), (delta,))
        return out0 + tangent
