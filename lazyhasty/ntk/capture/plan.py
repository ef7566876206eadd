"""The layer plan: which parameters get which exact per-layer treatment (:func:`plan_layers` -> :class:`LayerPlan`).

A :class:`LayerPlan` names a layer, its :class:`LayerKind`, its parameters and its form (ghost or
materialized); it holds no captured tensor. Parameters no plan covers go to the generic fallback
(per-example copies or ``torch.func``), which the caller records with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from .caches import DIRECT
from .norm_calls import at_norm_call
from .sites import InProjection, RecurrentProjection, capture_modules, matmul_sites


NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# Recognised by isinstance: a subclass (a cosine / weight-normalised Linear, a custom LayerNorm) is planned like
# its base class and kept only if the layer check confirms its per-example gradients; one whose forward
# computes something else (W(theta), permuted inputs) fails the check and goes to the exact fallback.
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding) + NORM_TYPES + CONV_TRANSPOSE_TYPES


class LayerKind(str, Enum):
    """How a planned layer's parameters are captured (a ``str``: ``LayerKind.CONV == "conv"``).

    ``LINEAR``: ``y = W a + b`` at each position (``nn.Linear``, packed attention and recurrent maps, matmul
    sites); ``CONV``: N-d convolutions (patches); ``CONVT``: transposed convolutions (adjoint patches);
    ``EMBEDDING``: table lookups (index comparisons); ``NORM``: elementwise affine parameters on a normalized
    input (and a transposed convolution's bias, captured the same way).
    """

    LINEAR = "linear"
    CONV = "conv"
    CONVT = "convT"
    EMBEDDING = "embedding"
    NORM = "norm"

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass
class LayerPlan:
    name: str
    module: nn.Module
    kind: LayerKind  # (a plain string is converted)
    use_weight: bool
    use_bias: bool
    form: str | None = None  # ghost | materialized (chosen on the first block)
    # In-place safety: a later in-place op (ReLU(inplace=True), ``out += identity``) on a captured input or
    # output would change what the layer's gradient is computed from. Capture records the tensors' version
    # counters (``captured.Calls``); when one moved, the layer captures a copy of its input / hands the model a
    # copy of its output (so the captured tensor stays the one the layer's backward sees) and the block is
    # captured again.
    copy_input: bool = False
    copy_output: bool = False
    costs: dict | None = None  # the cost model's flops per example pair for each form (set with ``form``)
    # the parameters reach the layer's effective (weight, bias) through an example-independent map; per-example
    # gradients of the effective weight go through it by one batched vector-Jacobian product (materialized):
    # "parametrize": torch.nn.utils.parametrize (weight norm, orthogonal, spectral norm), the originals;
    # "affine": a Linear subclass computing W(theta) in its forward (found out by the layer check), whose
    # effective map is read off the module itself (affine_map); False: the plain weight
    weight_map: str | bool = False
    # a norm subclass with its own forward (timm's BatchNormAct2d, LayerNorm2d): captured at its norm call, not at
    # its output (``norm_calls``; the calls' function and other arguments are in ``captured.Calls.call_args``)
    at_call: bool = False

    def __post_init__(self):
        self.kind = LayerKind(self.kind)

    def fresh(self) -> "LayerPlan":
        """A copy of the plan's decisions (layer, kind, parameters, weight map, in-place copies) with no form
        chosen yet (the form depends on the call: its outputs and example pairs). A plan holds no captured
        tensor: a capture forward returns them (``captured.Captured``)."""
        return replace(self, form=None, costs=None)

    def params(self) -> list[tuple[str, torch.Tensor]]:
        if self.weight_map == "affine":
            return [(n, t) for n, t in self.module.named_parameters() if t.requires_grad]
        out = []
        if self.use_weight and self.weight_map:
            out.extend(self.module.parametrizations.weight.named_parameters())
        elif self.use_weight:
            out.append(("weight", self.module.weight))
        if self.use_bias:
            out.append(("bias", self.module.bias))
        return out


def trainable_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter (requires_grad=True): its NTK is zero")
    return params


# Reading an affine map off a module by its outputs costs a forward on d_in + 1 basis inputs, and its VJP one
# backward of that per example and output: (d_in + 1) d_in d_out flops a row, d_in times a materialized row's.
# Measured (2-core CPU, benchmarks/bench_zoo.py "cosine-mlp", a 256 -> 256 cosine Linear): 0.63x of torch.func for
# the full kernel. So only narrow inputs take that path. A module whose forward is one F.linear call on its own
# input, returned as is, needs no basis: its (W, b) are that call's operands, whatever d_in (direct_linear).
AFFINE_MAX_IN = 64


class _LinearCalls(TorchFunctionMode):
    """Records each ``F.linear`` call's (input, weight, bias, output) while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            names = ("input", "weight", "bias")
            ops = list(args) + [kwargs.get(k) for k in names[len(args):]]
            self.calls.append((*ops[:3], out))
        return out


def direct_linear(m: nn.Module, x: torch.Tensor):
    """``(W, b)`` — the weight and bias operands (``b`` may be None) of the one ``F.linear`` call through which
    ``m(x)`` computes its output, when the forward is exactly that: one call, on ``x`` itself, whose result
    it returns unchanged (a cosine or weight-normalised Linear). None otherwise (a scale after the call,
    a transformed input, several calls). The operands are differentiable functions of the parameters."""
    rec = _LinearCalls()
    with rec:
        out = m(x)
    if len(rec.calls) != 1:
        return None
    inp, W, b, res = rec.calls[0]
    if res is not out or inp is not x or W is None or W.shape != m.weight.shape:
        return None
    return W, b


def affine_candidate(m: nn.Module) -> bool:
    """A subclass of nn.Linear with its own forward, whose parameters are its own, either on at most
    :data:`AFFINE_MAX_IN` inputs or computing its output by one direct ``F.linear`` call
    (:func:`direct_linear`, any width): it may compute an affine map of its input from its parameters (a
    cosine / normalised Linear), planned as such if the plain plan fails."""
    if not (isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward
            and not parametrize.is_parametrized(m) and not list(m.children())):
        return False
    if m.in_features <= AFFINE_MAX_IN:
        return True
    if m not in DIRECT:
        p = m.weight
        with torch.no_grad():
            DIRECT[m] = direct_linear(m, torch.zeros(1, m.in_features, dtype=p.dtype, device=p.device)) is not None
    return DIRECT[m]


def plan_layers(model: nn.Module, implementation: str, excluded: set[int] = frozenset(),
                affine: set[int] = frozenset(), sites: dict | None = None):
    """(layer plans, generic parameter names) covering every trainable parameter exactly once."""
    params = trainable_params(model)
    if implementation == "jacobian":
        return [], [n for n, _ in params]
    owners: dict[int, int] = {}
    holders: dict[int, list] = {}  # parameter -> the modules holding it, in named_modules order
    for _, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
                holders.setdefault(id(p), []).append(m)

    def sole(t, m) -> bool:
        """Whether ``m``'s plan takes the parameter ``t``: its only holder, or a tied parameter (held by several
        modules of one type, e.g. T5's ``shared`` and ``embed_tokens``) whose first holder not yet moved to the
        fallback is ``m`` (a holder whose forward never ran is moved there, and the next one planned; the layer
        check confirms that the one planned is the only one the model calls)."""
        if owners.get(id(t)) == 1:
            return True
        hs = holders.get(id(t), ())
        if not hs or any(type(h) is not type(m) for h in hs):
            return False
        live = [h for h in hs if id(h) not in excluded]
        return bool(live) and live[0] is m
    plans, covered = [], set()
    for name, m in capture_modules(model):
        if not isinstance(m, LINEAR_TYPES + (InProjection, RecurrentProjection)) or id(m) in excluded:
            continue
        if id(m) in affine:
            own = [t for t in m._parameters.values() if t is not None and t.requires_grad]
            if own and all(owners.get(id(t)) == 1 for t in own):
                # the effective (weight, bias) gradients: both factors present, then mapped to the parameters
                plans.append(LayerPlan(name, m, "linear", True, True, weight_map="affine"))
                covered.update(id(t) for t in own)
            continue
        if isinstance(m, nn.Embedding) and (m.scale_grad_by_freq or m.max_norm is not None):
            continue  # frequency scaling / renorm in forward: left to the exact fallback
        proxy = isinstance(m, (InProjection, RecurrentProjection))
        mapped = isinstance(m, nn.Linear) and parametrize.is_parametrized(m, "weight")
        originals = list(m.parametrizations.weight.parameters()) if mapped else []
        w = m.weight if proxy else m._parameters.get("weight")
        b = m.bias if proxy else m._parameters.get("bias")
        use_w = w is not None and w.requires_grad and (owners.get(id(w)) == 1 or not proxy and sole(w, m))
        if mapped:
            use_w = bool(originals) and all(t.requires_grad and owners.get(id(t)) == 1 for t in originals)
        use_b = b is not None and b.requires_grad and (owners.get(id(b)) == 1 or not proxy and sole(b, m))
        if not (use_w or use_b):
            continue
        if isinstance(m, CONV_TRANSPOSE_TYPES):
            # the weight by the adjoint convolution (input x at input positions, patches of the output
            # gradient); the bias, added at every output position, as its own materialized plan
            if use_w:
                plans.append(LayerPlan(name, m, "convT", True, False))
            if use_b:
                plans.append(LayerPlan(name, m, "norm", False, True))
            covered.update(id(t) for t, on in ((w, use_w), (b, use_b)) if on)
            continue
        kind = ("linear" if isinstance(m, (nn.Linear, InProjection, RecurrentProjection)) else "conv" if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                else "embedding" if isinstance(m, nn.Embedding) else "norm")
        plans.append(LayerPlan(name, m, kind, use_w, use_b, weight_map=mapped and use_w,
                               at_call=kind == "norm" and at_norm_call(m)))
        if use_w and mapped:
            covered.update(id(t) for t in originals)
        elif use_w:
            covered.add(id(w))
        if use_b:
            covered.add(id(b))
    named = dict(model.named_parameters())
    for w, site in matmul_sites(model, sites or {}).items():
        b = site._names[1]
        if id(site) in excluded or id(named[w]) in covered or (b is not None and id(named[b]) in covered):
            continue
        use_w, use_b = named[w].requires_grad, b is not None and named[b].requires_grad
        if use_w or use_b:
            plans.append(LayerPlan(f"{w}:matmul", site, "linear", use_w, use_b))
            covered.update(id(named[n]) for n, on in ((w, use_w), (b, use_b)) if on)
    generic = [n for n, p in params if id(p) not in covered]
    return plans, generic
