"""Per-example stand-ins for parameters the model broadcasts against the batch at an elementwise operation.

A tensor ``E`` computed from parameters alone (no example enters it) and combined with the batch by an
elementwise, broadcasting operation (``x * E``, ``x + E``, ``torch.addcmul(E1, E2, x)``, ``x += E``, ...) with
``E``'s batch dimension broadcast (``[1, ...]`` or fewer dimensions than ``x``) gives example ``i``'s output
through ``E`` alone. Replacing ``E`` at that operation by ``b`` copies of itself, a leaf ``S`` ``[b, ...]``,
changes no value, and autograd's gradient of ``S[i]`` is example ``i``'s gradient of ``E``:

    dE_i = dS[i],     d theta_i = (dE/d theta)^T dE_i   (one batched vector-Jacobian product; a reshape when E
                                                       is a parameter or a view of one)

This covers layer scales of any shape (``x.mul(gamma.reshape(1, -1, 1, 1))``, ``ls1 * x``), elementwise norm
weights (T5's ``weight * hidden``), ``Affine``'s ``addcmul(beta, alpha, x)``, position embeddings looked up on a
``[1, L]`` index buffer and added to the batch (BERT, GPT-2), and an attention bias ``[1, H, L, L]`` added to
the scores (T5's relative attention bias). A norm call ``F.batch_norm`` / ``F.layer_norm`` / ``F.group_norm`` /
``F.rms_norm`` whose affine parameters are candidates runs as the normalization without them, then ``xhat * w +
b`` at the same operation (timm's ``BatchNormAct2d``, ``LayerNorm2d``: whatever follows the call, an activation
or a permute, is the model's own code). Which tensors are computed from examples is followed through one forward
under a :class:`~torch.overrides.TorchFunctionMode` (:class:`BroadcastStandIns`): the input and every result of
an operation on one are batch tensors; parameters, buffers and constants, and results of operations on those
only, are not, and carry the names of the parameters they are computed from.

Whether a parameter's per-example gradients come out exact this way (its every use is such an operation, no op
mixes examples afterwards) is what the caller's check decides (``Featurizer.per_example_copies``).
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .backward import batched_vjp
from .sites import metadata_only

# Elementwise, broadcasting operations (torch functions, Tensor methods, operators, in-place forms) by name.
ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "true_divide", "rsub", "addcmul", "addcdiv", "where", "lerp", "maximum", "minimum",
    "add_", "sub_", "mul_", "div_", "addcmul_", "addcdiv_", "lerp_",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__div__",
})
# Norm calls whose affine parameters may be stand-ins: how the weight broadcasts (over channels on dim 1, or the
# trailing normalized_shape).
NORM_CALLS = {F.batch_norm: "channel", F.group_norm: "channel", F.layer_norm: "trailing"}
if hasattr(F, "rms_norm"):
    NORM_CALLS[F.rms_norm] = "trailing"
_SIGNATURES = {f: inspect.signature(f) for f in NORM_CALLS}
_BLOCKED = None  # provenance of a tensor computed from a parameter that is not a candidate


@dataclass
class StandIn:
    """One stand-in: ``leaf`` ``[b, *E.shape aligned]`` replacing ``source`` (``E``, with its graph to the
    parameters ``names``) at operation ``op``."""

    leaf: torch.Tensor
    source: torch.Tensor
    names: tuple
    op: str


def _op_name(func) -> str:
    return getattr(func, "__name__", "") or ""


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class BroadcastStandIns(TorchFunctionMode):
    """While active (around one forward of a block of ``b`` examples), replaces each tensor computed only from
    the parameters ``candidates`` by a per-example stand-in where an elementwise operation broadcasts it against
    the batch; :attr:`standins` lists them in order, :meth:`ops` names the operations per parameter.

    Args:
        named: the model's parameters by name (what the forward reads).
        candidates: the names that may be replaced (the rest block: a tensor computed from one stays as it is).
        b: the block's examples (the batch dimension's size).
    """

    def __init__(self, named: dict, candidates, b: int):
        super().__init__()
        cand = set(candidates)
        self._param = {id(t): (n if n in cand else _BLOCKED) for n, t in named.items()}
        self._refs = {id(t): t for t in named.values()}
        self.b = b
        self._batch: dict = {}  # id -> weakref of a batch tensor
        self._prov: dict = {}  # id -> (weakref, frozenset of names | _BLOCKED)
        self._cache: dict = {}
        self.standins: list[StandIn] = []

    def mark(self, t: torch.Tensor) -> torch.Tensor:
        """Declares ``t`` (the model's input) a batch tensor; returns it."""
        self._batch[id(t)] = weakref.ref(t)
        return t

    def ops(self) -> dict:
        """``{parameter name: sorted operation names}`` where stand-ins replaced tensors computed from it."""
        out: dict = {}
        for s in self.standins:
            for n in s.names:
                out.setdefault(n, set()).add(s.op)
        return {n: sorted(v) for n, v in out.items()}

    # -- provenance ----------------------------------------------------------------------------------
    def _is_batch(self, t) -> bool:
        ref = self._batch.get(id(t))
        return ref is not None and ref() is t

    def _provenance(self, t):
        if id(t) in self._param and self._refs.get(id(t)) is t:
            n = self._param[id(t)]
            return _BLOCKED if n is _BLOCKED else frozenset((n,))
        got = self._prov.get(id(t))
        if got is not None and got[0]() is t:
            return got[1]
        return frozenset()

    def _union(self, tensors):
        out = frozenset()
        for t in tensors:
            p = self._provenance(t)
            if p is _BLOCKED:
                return _BLOCKED
            out |= p
        return out

    def _register(self, out, batch: bool, prov) -> None:
        for t in _tensors(out):
            if batch:
                self._batch[id(t)] = weakref.ref(t)
            elif prov is _BLOCKED or prov:
                self._prov[id(t)] = (weakref.ref(t), prov)

    def _eligible(self, t) -> bool:
        if not isinstance(t, torch.Tensor) or self._is_batch(t) or not t.requires_grad or not t.is_floating_point():
            return False
        p = self._provenance(t)
        return p is not _BLOCKED and bool(p)

    def _standin(self, t: torch.Tensor, aligned: list, op: str) -> torch.Tensor:
        key = (id(t), tuple(aligned))
        got = self._cache.get(key)
        if got is not None and got.source is t:
            return got.leaf
        leaf = t.detach().reshape(aligned).expand(self.b, *aligned[1:]).clone().requires_grad_()
        s = StandIn(leaf, t, tuple(sorted(self._provenance(t))), op)
        self._cache[key] = s
        self.standins.append(s)
        self._batch[id(leaf)] = weakref.ref(leaf)
        return leaf

    # -- the mode ------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if metadata_only(func):
            return func(*args, **kwargs)
        tensors = list(_tensors(args)) + list(_tensors(kwargs))
        batch = any(self._is_batch(t) for t in tensors)
        if batch and func in NORM_CALLS:
            out = self._norm(func, args, kwargs)
            if out is not None:
                self._register(out, True, None)
                return out
        if batch and _op_name(func) in ELEMENTWISE:
            args, kwargs = self._substitute(func, args, kwargs)
        elif batch and func is F.scaled_dot_product_attention:
            args, kwargs = self._attention_bias(args, kwargs)
        out = func(*args, **kwargs)
        self._register(out, batch, None if batch else self._union(tensors))
        return out

    def _substitute(self, func, args, kwargs):
        """``args`` / ``kwargs`` with each eligible operand replaced by its stand-in (aligned to the result's
        rank, its batch dimension broadcast)."""
        shapes = [t.shape for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        try:
            shape = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            return args, kwargs
        if len(shape) == 0 or shape[0] != self.b:
            return args, kwargs
        name = _op_name(func)
        inplace = name.endswith("_") and not name.startswith("__") or name.startswith("__i")

        def swap(i, t):
            if (inplace and i == 0) or not self._eligible(t):
                return t
            aligned = [1] * (len(shape) - t.dim()) + list(t.shape)
            if aligned[0] != 1:
                return t
            return self._standin(t, aligned, name.strip("_"))

        args = tuple(swap(i, t) for i, t in enumerate(args))
        kwargs = {k: swap(1, t) for k, t in kwargs.items()}
        return args, kwargs

    def _attention_bias(self, args, kwargs):
        """``scaled_dot_product_attention(q, k, v, attn_mask=E)`` adds a float ``E`` to the scores ``[b, ..., L,
        S]`` elementwise: ``E`` as a stand-in there (T5's relative attention bias on the SDPA path)."""
        q = args[0] if args else kwargs.get("query")
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if not isinstance(q, torch.Tensor) or not self._eligible(mask) or q.dim() < mask.dim() or q.shape[0] != self.b:
            return args, kwargs
        aligned = [1] * (q.dim() - mask.dim()) + list(mask.shape)
        if aligned[0] != 1:
            return args, kwargs
        leaf = self._standin(mask, aligned, "scaled_dot_product_attention")
        if len(args) > 3:
            return args[:3] + (leaf,) + tuple(args[4:]), kwargs
        return args, {**kwargs, "attn_mask": leaf}

    def _norm(self, func, args, kwargs):
        """A norm call with candidate affine parameters as ``norm(x) * w + b`` with stand-ins; None when the
        call is not one (the plain call then runs)."""
        try:
            bound = _SIGNATURES[func].bind(*args, **kwargs)
        except TypeError:
            return None
        a = bound.arguments
        x, w, bias = a.get("input"), a.get("weight"), a.get("bias")
        if not isinstance(x, torch.Tensor) or not self._is_batch(x) or x.dim() < 2 or x.shape[0] != self.b:
            return None
        if a.get("training", False) or (w is None and bias is None):
            return None
        if any(t is not None and not self._eligible(t) for t in (w, bias)):
            return None
        a["weight"] = None
        if "bias" in a:
            a["bias"] = None
        y = func(*bound.args, **bound.kwargs)
        name = func.__name__
        for t, combine in ((w, torch.mul), (bias, torch.add)):
            if t is None:
                continue
            if NORM_CALLS[func] == "channel":
                view = [1, t.numel()] + [1] * (x.dim() - 2)
                src = t.reshape(view)
                self._prov[id(src)] = (weakref.ref(src), self._provenance(t))
                y = combine(y, self._standin(src, view, name))
            else:
                y = combine(y, self._standin(t, [1] * (x.dim() - t.dim()) + list(t.shape), name))
        return y


def standin_grads(standins: list, grads: list, named: dict) -> dict:
    """``{parameter name: [b, k, numel]}`` per-example gradients from the stand-ins' gradients.

    Args:
        standins: the :class:`StandIn` s of one forward.
        grads: per stand-in, its gradients ``[b, k, *leaf.shape[1:]]`` (every output's).
        named: the model's parameters by name.

    Returns:
        The per-example gradients of every parameter a stand-in was computed from, summed over its stand-ins.
    """
    out: dict = {}
    for s, g in zip(standins, grads):
        b, k = g.shape[:2]
        rows = g.reshape(b * k, *s.source.shape)
        p = named[s.names[0]] if len(s.names) == 1 else None
        if p is not None and (s.source is p or (s.source._base is p and s.source.is_contiguous()
                                                and p.is_contiguous() and s.source.numel() == p.numel())):
            parts = {s.names[0]: rows.reshape(b, k, -1)}
        else:
            params = [named[n] for n in s.names]
            with torch.enable_grad():
                flat = batched_vjp((s.source,), params, (rows,))
            parts, off = {}, 0
            for n, t in zip(s.names, params):
                parts[n] = flat[:, off: off + t.numel()].reshape(b, k, -1)
                off += t.numel()
        for n, t in parts.items():
            out[n] = t if n not in out else out[n] + t
    return out
