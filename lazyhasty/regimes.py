"""Training regimes from one initialization: alpha-scaled models and the exact linearization.

``AlphaScaled(model, alpha)`` computes ``f_0(x) + alpha (f(x) - f_0(x))`` (paper eq. 4) and is trained with
``scaled_lr(lr, alpha) = lr / alpha^2``: alpha = 1 is standard training, alpha = 100 lazy, alpha < 1
extra adaptive. ``center=True`` gives ``alpha (f(x) - f_0(x))``, the form the authors' code trained.
``Linearized(model)`` is the exact first-order Taylor model around the parameters at wrap time
(the alpha -> infinity reference).

Both take the model's call as the model takes it (positional and keyword inputs, e.g. a Hugging Face batch
``wrapped(**batch)``) and act on one output tensor: the model's output when it is a tensor, its ``.logits`` when it
is an object carrying them (a Hugging Face ``ModelOutput``), or what ``output=`` selects. Their forward returns the
same kind of object the model does, with that field replaced (see ``AlphaScaled`` for the ``loss`` field).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable

import torch
from torch import nn


def _selected(out, output: str | Callable | None):
    """The tensor the regime acts on, and how to put a new value of it back into an output like ``out``.

    Args:
        out: what the model returned.
        output: ``None`` (a tensor, or ``out.logits``), an attribute / key name, or a callable ``out -> tensor``.

    Returns:
        ``(tensor, rebuild)``: ``rebuild(new)`` is ``new`` itself for a tensor output or a callable ``output``,
        else a shallow copy of ``out`` whose selected field is ``new`` and whose ``loss`` (if any) is ``None``.
    """
    from ._outputs import output_tensor

    t = output_tensor(out, output)  # the one picker of every entry point: its errors name output=
    if callable(output) or isinstance(out, torch.Tensor):
        return t, lambda new: new
    if output is None:
        output = "logits"
    if isinstance(out, (tuple, list)) and isinstance(output, int):
        return t, lambda new: type(out)([new if i == output % len(out) else v for i, v in enumerate(out)])

    def rebuild(new):
        fields = getattr(type(out), "__dataclass_fields__", None)
        if fields is not None:  # a ModelOutput (or any dataclass): a new one, so its dict and attribute views agree
            values = {f: getattr(out, f) for f in fields}
        elif isinstance(out, dict):
            values = dict(out)
        else:
            res = copy.copy(out)
            setattr(res, output, new)
            return res
        values[output] = new
        if values.get("loss") is not None:
            # the model's loss was computed from its own logits, not from the scaled or linearized ones
            warnings.warn(f"{type(out).__name__}.loss is the wrapped model's loss, not the regime's: it is set to "
                          "None; compute the loss from the returned logits (with the Hugging Face Trainer: "
                          "Trainer(compute_loss_func=...))", stacklevel=3)
            values["loss"] = None
        if fields is not None:
            return type(out)(**values)
        return type(out)({k: v for k, v in values.items() if not (k == "loss" and v is None)})

    return t, rebuild


def _is_tensor_tree(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (tuple, list)) and all(_is_tensor_tree(u) for u in v)


def _tensor_fields(out):
    """What of a model's output can leave a JVP as its auxiliary value (tensors, tuples of tensors).

    A ModelOutput or dict keeps its tensor fields; others (a ``DynamicCache`` of ``past_key_values``) become
    ``None``. A tensor output needs no auxiliary value (``()``: torch.func's auxiliary outputs must be tensors).
    """
    if isinstance(out, torch.Tensor):
        return ()
    fields = getattr(type(out), "__dataclass_fields__", None)
    if fields is not None:
        return type(out)(**{f: (v if _is_tensor_tree(v := getattr(out, f)) else None) for f in fields})
    if isinstance(out, dict):
        return type(out)({k: v for k, v in out.items() if _is_tensor_tree(v)})
    raise TypeError(f"Linearized: the model returned {type(out).__name__}; pass output= as a callable "
                    "(lambda out: ...) returning the tensor to linearize")


@contextlib.contextmanager
def _math_attention():
    """Attention through its differentiable decomposition while a forward-mode JVP runs.

    The fused kernels (``scaled_dot_product_attention``'s flash / memory-efficient ones, the
    ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` fast path) have no forward-mode derivative; the math
    backend and the plain module code compute the same function with one. Outside a JVP nothing changes.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def scaled_lr(lr: float, alpha: float) -> float:
    """`lr / alpha^2`: keeps the first-order change of `f_alpha` per step independent of alpha.

    Args:
        lr: the learning rate of standard training (alpha = 1).
        alpha: the scale of [AlphaScaled][lazyhasty.regimes.AlphaScaled], `> 0`.

    Returns:
        The learning rate for the alpha-scaled model.

    Raises:
        ValueError: `alpha <= 0`.

    Example:
        >>> scaled_lr(0.1, 100.0)
        1e-05
    """
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

    The scaled output is the model's tensor output, or its ``.logits`` (a Hugging Face ``ModelOutput``), or what
    ``output=`` names; the forward returns the same kind of object with that field scaled. A ``loss`` the model
    computed itself (Hugging Face models given ``labels``) is the unscaled model's, so it is set to ``None`` with a
    warning: compute the loss from the returned logits (``Trainer(compute_loss_func=...)``).

    Args:
        model: the network ``f``, called as it is called (``wrapped(x)``, ``wrapped(**batch)``).
        alpha: the scale ``alpha > 0`` (1: standard, 100: lazy, < 1: extra adaptive).
        center: return ``alpha (f - f_0)`` (the output is 0 at initialization).
        at: a ``state_dict`` (or module) ``theta_t`` to expand around instead of the model's current parameters.
        output: the field of a non-tensor output to scale: an attribute / key name, or a callable
            ``out -> tensor`` (then the forward returns the scaled tensor).

    Example:
        >>> lazy = AlphaScaled(net, 100.0)
        >>> opt = torch.optim.SGD(lazy.parameters(), lr=scaled_lr(0.1, 100.0))
        >>> logits = AlphaScaled(bert, 10.0)(**batch).logits   # [b, C], f_0 + 10 (f - f_0)
    """

    def __init__(self, model: nn.Module, alpha: float, *, center: bool = False, at=None,
                 output: str | Callable | None = None):
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
        self.output = output
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
        f, rebuild = _selected(self.model(*args, **kwargs), self.output)
        f0, _ = _selected(self._f0_of(args, kwargs), self.output)
        if self.center:
            return rebuild(self.alpha * (f - f0))
        return rebuild(f0 + self.alpha * (f - f0))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, center={self.center}"


class _Frozen(nn.Module):
    """Holds the expansion point as buffers (in state_dict, moved by .to, not parameters)."""


class Linearized(nn.Module):
    """Exact first-order Taylor model ``f(x; theta0) + J(x; theta0) (theta - theta0)`` (torch.func.jvp).

    Its parameters are the wrapped model's own (same order); ``theta0`` is a frozen copy taken at wrap
    time. Buffers (e.g. BatchNorm statistics) are read from the model, and the model's mode is used (dropout
    in train mode draws one mask for the value and its derivative). One forward costs about two forwards of
    the model (a forward-mode JVP). Attention runs through its math decomposition during the JVP (fused
    attention kernels have no forward-mode derivative); outside it the model is untouched.

    Args:
        model: the network ``f``, called as it is called (``lin(x)``, ``lin(**batch)``).
        output: which field of a non-tensor output to linearize (default: the tensor, or ``.logits``): an
            attribute / key name, or a callable ``out -> tensor`` (then the forward returns the tensor). The
            other fields of the returned object are the model's at ``theta0`` (tensors only: a cache such as
            ``past_key_values`` is ``None``); its ``loss`` is ``None``.

    Example:
        >>> lin = Linearized(net)
        >>> y = lin(x)                       # [b, k]: f(x; theta0) + J (theta - theta0)
        >>> logits = Linearized(bert)(**batch).logits
    """

    def __init__(self, model: nn.Module, *, output: str | Callable | None = None):
        super().__init__()
        self.model = model
        self.output = output
        self.theta0 = _Frozen()
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self._names:
            raise ValueError("the model has no trainable parameter to linearize")
        for i, n in enumerate(self._names):
            self.theta0.register_buffer(f"p{i}", dict(model.named_parameters())[n].detach().clone())

    def forward(self, *args, **kwargs):
        from torch.func import functional_call, jvp

        params = dict(self.model.named_parameters())
        theta0 = {n: getattr(self.theta0, f"p{i}") for i, n in enumerate(self._names)}
        delta = {n: params[n] - theta0[n] for n in self._names}

        def f(p):
            out = functional_call(self.model, p, args, kwargs)
            t, _ = _selected(out, self.output)
            return t, (() if callable(self.output) else _tensor_fields(out))

        with _math_attention():
            out0, tangent, raw = jvp(f, (theta0,), (delta,), has_aux=True)
        if isinstance(raw, tuple) and not raw:
            return out0 + tangent
        _, rebuild = _selected(raw, self.output)
        return rebuild(out0 + tangent)
