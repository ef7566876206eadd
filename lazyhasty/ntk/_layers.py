"""Which parameters get which exact per-layer treatment, and the features of one block of examples.

For the "layerwise" implementation every trainable parameter is covered exactly once:

* ``nn.Linear`` (any leading dims: positions are summed), ``nn.Conv1d`` / ``2d`` / ``3d`` (stride,
  padding incl. string and non-zero modes, dilation, groups), ``nn.ConvTranspose1d`` / ``2d`` / ``3d`` (by the
  adjoint convolution: input at input positions, patches of the output gradient; bias as its own plan) and
  ``nn.Embedding``: from the captured layer input and the output gradient, either in ghost form or as
  materialized per-example gradients, chosen per layer by a cost model;
* ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: the input and hidden maps as :class:`RecurrentProjection` sites,
  hooked while :func:`unrolled_recurrent` runs;
* ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``, ``nn.BatchNorm*d`` in eval mode (affine parameters): materialized
  per-example gradients from the normalized input;
* ``nn.MultiheadAttention`` self- and cross-attention: the packed ``in_proj_weight`` as an :class:`InProjection`
  (a linear layer, hooked while :func:`unrolled_attention` runs) and ``out_proj`` as a Linear;
* subclasses of all of these, kept only when the layer check confirms them;
* parameters the model's own code multiplies directly (``h @ W``, ``W @ h``, ``torch.matmul``, ``torch.mm``,
  ``torch.addmm(b, h, W)``, ``F.linear(h, W, b)``, per-head weights ``[H, d_in, d_out]``: :data:`SITE_LAYOUTS`):
  :class:`MatmulSite` linear layers (grouped for per-head weights), found by :func:`discover_sites`;
* every other trainable parameter (other modules, parameters shared between modules, parametrized
  weights, ``scale_grad_by_freq`` embeddings...): per-example copies where the model only broadcasts it
  against the batch (``Featurizer.per_example_copies``), else exact per-example Jacobians by ``torch.func``
  (``vmap(jacrev)``) for those parameters only.

A module called several times per forward contributes the positions of all its calls. Once per model
structure, each layer's per-example gradients, weighted by random example and output weights, are
checked against autograd's gradient of the same weighted sum, on a perturbed copy of the model
(``Featurizer.verify_on_twin``); a parameter also used outside its module's forward, or a module whose
batch is not dim 0, fails that check and is moved to the exact fallback, so no term is ever missing.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from .._outputs import SelectOutput, select_output, tensor_output  # noqa: F401  (moved to _outputs)
from .._precision import exact_fp32


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# Recognised by isinstance: a subclass (a cosine / weight-normalised Linear, a custom LayerNorm) is planned like
# its base class and kept only if the layer check confirms its per-example gradients; one whose forward
# computes something else (W(theta), permuted inputs) fails the check and goes to the exact fallback.
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding) + _NORMS + _CONV_TRANSPOSE


class InProjection(nn.Module):
    """The packed input projection of an ``nn.MultiheadAttention`` (``in_proj_weight`` ``[3E, E]``,
    ``in_proj_bias``) as a module of its own, so capture can hook it like an ``nn.Linear``: while the
    tangent features are captured, the attention runs :func:`unrolled_attention`, which calls it. Not a
    child of the attention module (its structure and state_dict do not change); the parameters are read
    from the attention module each time."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        # a weak reference: not a child module, and the cache keyed by the owner (a WeakKeyDictionary) must not
        # keep it alive through its value
        self._owner = weakref.ref(attention)
        self.in_features, self.out_features = attention.embed_dim, 3 * attention.embed_dim

    @property
    def weight(self) -> torch.Tensor:
        return self._owner().in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self._owner().in_proj_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


_IN_PROJECTIONS: "weakref.WeakKeyDictionary[nn.MultiheadAttention, InProjection]" = weakref.WeakKeyDictionary()


def in_projection(attention: nn.MultiheadAttention) -> InProjection:
    """The one :class:`InProjection` of an attention module (stable, so exclusions by id stick)."""
    proj = _IN_PROJECTIONS.get(attention)
    if proj is None:
        proj = _IN_PROJECTIONS[attention] = InProjection(attention)
    return proj


def unrollable(m: nn.Module) -> bool:
    """An attention module whose packed projection :func:`unrolled_attention` can capture."""
    return (isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim and m.bias_k is None
            and not m.add_zero_attn and m.in_proj_weight is not None)


def unrolled_attention(m: nn.MultiheadAttention, proj: InProjection, original):
    """``m.forward`` for capture: the packed projection as hooked calls of ``proj`` (batch first), torch's own
    attention core on the projected q, k, v (identity projections: exact), then ``m.out_proj(...)`` as a module
    call (batch first, hooked). Self-attention (query is key is value) projects once and splits; cross-attention
    projects the query, and the key and value (once when they are the same tensor), each with the whole packed
    map, and keeps its slice: the unused slices get no gradient, so the per-example gradient of
    ``in_proj_weight`` summed over the calls is exact (each call's positions pooled, like any module called
    several times). Unbatched inputs run ``original``: the projection then never runs and its parameters go to
    the exact fallback."""
    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            return original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        E = m.embed_dim

        def first(t):  # [N, L, E] batch first, for the hooked projection
            return t if m.batch_first else t.transpose(0, 1)

        if query is key and key is value:
            q, k, v = proj(first(query)).transpose(0, 1).chunk(3, dim=-1)  # each [L, N, E]
        else:
            q = proj(first(query)).transpose(0, 1)[..., :E]
            kv = proj(first(key)).transpose(0, 1)
            k = kv[..., E:2 * E]
            v = (kv if value is key else proj(first(value)).transpose(0, 1))[..., 2 * E:]
        eye = torch.eye(E, dtype=query.dtype, device=query.device)
        attn, weights = F.multi_head_attention_forward(
            q, k, v, E, m.num_heads, None, None, None, None, False, m.dropout, eye, None,
            training=m.training, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        out = m.out_proj(attn.transpose(0, 1))  # [N, L, E]
        return (out if m.batch_first else out.transpose(0, 1)), weights
    return forward


class RecurrentProjection(nn.Module):
    """One of a fused recurrent module's linear maps (``weight_ih_l{k}[_reverse]`` with ``bias_ih_...``, or
    ``weight_hh_...`` with ``bias_hh_...``) as a module of its own, hooked like an ``nn.Linear`` while
    :func:`unrolled_recurrent` runs: the input map is called once on the whole sequence (positions = time
    steps), the hidden map once per step (a module called several times: its positions are pooled). Not a
    child of the recurrent module; the parameters are read from it each time."""

    def __init__(self, rnn: nn.RNNBase, weight: str, bias: str | None):
        super().__init__()
        self._owner = weakref.ref(rnn)  # (weak: see InProjection)
        self._names = (weight, bias)
        w = getattr(rnn, weight)
        self.out_features, self.in_features = w.shape

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._owner(), self._names[0])

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self._owner(), self._names[1]) if self._names[1] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


_RECURRENT: "weakref.WeakKeyDictionary[nn.RNNBase, dict]" = weakref.WeakKeyDictionary()


def recurrent_projections(rnn: nn.RNNBase) -> dict:
    """``{"ih_l0": RecurrentProjection, "hh_l0": ..., "ih_l0_reverse": ...}`` of an unrollable recurrent
    module (stable objects, so exclusions by id stick)."""
    got = _RECURRENT.get(rnn)
    if got is None:
        got = {}
        for layer in range(rnn.num_layers):
            for sfx in ("", "_reverse")[: 2 if rnn.bidirectional else 1]:
                for kind in ("ih", "hh"):
                    key = f"{kind}_l{layer}{sfx}"
                    got[key] = RecurrentProjection(rnn, f"weight_{key}", f"bias_{key}" if rnn.bias else None)
        _RECURRENT[rnn] = got
    return got


def unrollable_recurrent(m: nn.Module) -> bool:
    """nn.RNN / nn.LSTM / nn.GRU without projections (``proj_size``): :func:`unrolled_recurrent` computes them."""
    return (type(m) in (nn.RNN, nn.LSTM, nn.GRU) and getattr(m, "proj_size", 0) == 0)


def unrolled_recurrent(m: nn.RNNBase, original):
    """``m.forward`` for capture: the same recurrence step by step in torch ops, its linear maps as hooked
    :class:`RecurrentProjection` calls (batch first). Packed sequences run ``original`` (the maps then never
    run and their parameters go to the exact fallback). Dropout between layers is not applied (eval mode;
    a training-mode dropout is refused before capture)."""
    sites = recurrent_projections(m)
    lstm, gru = isinstance(m, nn.LSTM), isinstance(m, nn.GRU)

    def cell(gi, h, c, key):
        gh = sites["hh_" + key](h)
        if lstm:
            i, f, g, o = (gi + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        if gru:
            ir, iz, inn = gi.chunk(3, -1)
            hr, hz, hn = gh.chunk(3, -1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(inn + r * hn)
            return (1 - z) * n + z * h, None
        pre = gi + gh
        return (torch.tanh(pre) if m.nonlinearity == "tanh" else torch.relu(pre)), None

    def forward(input, hx=None):
        if not isinstance(input, torch.Tensor) or input.dim() != 3:
            return original(input, hx)
        x = input if m.batch_first else input.transpose(0, 1)  # [b, T, I]
        b, T = x.shape[:2]
        D, H = (2 if m.bidirectional else 1), m.hidden_size
        if hx is None:
            h0 = x.new_zeros(m.num_layers * D, b, H)
            c0 = x.new_zeros(m.num_layers * D, b, H) if lstm else None
        else:
            h0, c0 = hx if lstm else (hx, None)
        hs, cs = [], []
        for layer in range(m.num_layers):
            outs = []
            for d in range(D):
                key = f"l{layer}" + ("_reverse" if d else "")
                gi = sites["ih_" + key](x)  # [b, T, G H]: the input map on every step at once
                h, c = h0[layer * D + d], (c0[layer * D + d] if lstm else None)
                steps = range(T - 1, -1, -1) if d else range(T)
                seq = [None] * T
                for t in steps:
                    h, c = cell(gi[:, t], h, c, key)
                    seq[t] = h
                outs.append(torch.stack(seq, 1))
                hs.append(h)
                cs.append(c)
            x = torch.cat(outs, -1) if D > 1 else outs[0]
        out = x if m.batch_first else x.transpose(0, 1)
        h_n = torch.stack(hs)
        return (out, (h_n, torch.stack(cs))) if lstm else (out, h_n)
    return forward


_MATMULS = (torch.matmul, torch._C.TensorBase.matmul, torch.mm)
# How a MatmulSite's weight W multiplies the batch-first input h (the layout of the call it was found in):
SITE_LAYOUTS = {
    "linear": "F.linear(h, W[, b]): W [d_out, d_in], h [b, ..., d_in]",
    "h@W": "h @ W, torch.matmul(h, W), torch.mm(h, W), torch.addmm(b, h, W): W [d_in, d_out], h [b, ..., d_in]",
    "W@h": "W @ h, torch.matmul(W, h): W [d_out, d_in], h [b, ..., d_in, S] (features in the second-last dim)",
    "grouped": "h @ W with W [G, d_in, d_out] (one map per group, e.g. per head): h [b, ..., G, S, d_in]",
}


class MatmulSite(nn.Module):
    """A fallback parameter that the model's own code multiplies directly (see :data:`SITE_LAYOUTS`) as a
    linear layer of its own (``groups`` maps for a 3-d weight): while capturing, a narrow TorchFunctionMode
    (:class:`SiteRecorder`) records each such call's input and output as a hook would, in the layout
    ``[b, ..., S, G, d]`` the linear factors read. Not a child of the model; found by :func:`discover_sites`."""

    def __init__(self, model: nn.Module, weight: str, bias: str | None, layout: str):
        super().__init__()
        self._owner = weakref.ref(model)  # (weak: see InProjection)
        self._names = (weight, bias)
        self.layout = layout
        w = self.weight
        self.groups = w.shape[0] if layout == "grouped" else 1
        self.in_features, self.out_features = ((w.shape[-2], w.shape[-1]) if layout in ("h@W", "grouped")
                                               else (w.shape[1], w.shape[0]))

    @property
    def transposed(self) -> bool:
        """The weight is stored ``[..., d_in, d_out]`` (the factor layout is ``[G, d_out, d_in]``)."""
        return self.layout in ("h@W", "grouped")

    def _get(self, name):
        return dict(self._owner().named_parameters())[name]

    @property
    def weight(self) -> torch.Tensor:
        return self._get(self._names[0])

    @property
    def bias(self) -> torch.Tensor | None:
        return self._get(self._names[1]) if self._names[1] else None

    def record(self, func, args, b: int | None = None):
        """``(input, output to record, output for the model)`` of one call, the recorded pair in the
        ``[b, ..., S, G, d]`` layout: for ``W @ h`` and grouped products the same product computed on the
        moved input, and the model given the moved-back view of it. ``b``: the block's examples; a 2-d ``h``
        of ``b S`` rows (batch and positions merged, ``torch.addmm(bias, x.view(-1, d), W)``: Hugging Face's
        ``Conv1D``) is recorded as ``[b, S, d]``, the model given the merged view (the layer check confirms that
        the rows are example-major)."""
        if self.layout == "h@W" and b is not None:
            h = args[1] if func is torch.addmm else args[0]
            if h.dim() == 2 and h.shape[0] != b and h.shape[0] % b == 0:
                out = func(*args)
                rec = out.view(b, -1, out.shape[-1])
                return h.view(b, -1, h.shape[-1]), rec, rec.view(out.shape)
        if self.layout == "W@h":
            h = args[1].transpose(-1, -2)
            out = F.linear(h, args[0])  # [b, ..., S, d_out] = (W @ h)ᵀ
            return h, out, out.transpose(-1, -2)
        if self.layout == "grouped":
            h = args[0].movedim(-3, -2)  # [b, ..., S, G, d_in]
            out = torch.einsum("...gi,gio->...go", h, args[1])
            return h, out, out.movedim(-2, -3)
        out = func(*args)
        return (args[1] if func is torch.addmm else args[0]), out, out


_SITES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def matmul_sites(model: nn.Module, specs: dict) -> dict:
    """``{weight name: MatmulSite}`` for ``specs`` ``{weight name: (bias name | None, layout)}`` (stable
    objects per model and spec, so exclusions by id stick)."""
    cache = _SITES.setdefault(model, {})
    out = {}
    for name, (bias, layout) in specs.items():
        key = (name, bias, layout)
        if key not in cache:
            cache[key] = MatmulSite(model, name, bias, layout)
        out[name] = cache[key]
    return out


def _site_call(func, args, kwargs, ids: dict):
    """``(weight name, bias name | None, layout)`` when ``func(*args)`` multiplies a parameter of ``ids``
    (id -> name) as a linear map of a batch-first input (:data:`SITE_LAYOUTS`); None otherwise."""
    if kwargs:
        return None
    if func in _MATMULS and len(args) == 2:
        h, w = args
        if id(w) in ids and h.dim() >= 2 and not id(h) in ids:
            if w.dim() == 2:
                return ids[id(w)], None, "h@W"
            if w.dim() == 3 and func is not torch.mm and h.dim() >= 4 and h.shape[-3] == w.shape[0]:
                return ids[id(w)], None, "grouped"
        if id(h) in ids and h.dim() == 2 and w.dim() >= 3 and func is not torch.mm and not id(w) in ids:
            return ids[id(h)], None, "W@h"
        return None
    if func is torch.addmm and len(args) == 3 and id(args[2]) in ids and args[2].dim() == 2 and args[1].dim() == 2:
        b = args[0]
        if id(b) not in ids or b.dim() != 1:
            return None
        return ids[id(args[2])], ids[id(b)], "h@W"
    if func is torch._C._nn.linear and len(args) >= 2 and id(args[1]) in ids and args[1].dim() == 2:
        b = args[2] if len(args) > 2 else None
        if b is not None and id(b) not in ids:
            return None
        return ids[id(args[1])], (ids[id(b)] if b is not None else None), "linear"
    return None


# Reading these from a parameter (``W.shape[0]``, ``W.dim()``) is not a use of its values.
_METADATA = frozenset({"shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "layout", "is_leaf",
                       "dim", "size", "numel", "stride", "is_contiguous", "element_size", "__len__"})


def _metadata_only(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property read: the descriptor's name
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name in _METADATA


def discover_sites(model: nn.Module, call, x: torch.Tensor, candidates: list[str]) -> dict:
    """Which of the fallback parameters ``candidates`` the model only uses as the weight of direct matrix
    products (one forward of ``call(x)`` under a TorchFunctionMode): ``{weight: (bias | None, layout)}``.
    A parameter also used any other way (transposed with ``.T``, passed to a Python-level torch function,
    read elementwise) is left out."""
    named = dict(model.named_parameters())
    ids = {id(named[n]): n for n in candidates if named[n].dim() in (1, 2, 3)}
    found: dict = {}  # weight -> (bias, layout: a key of SITE_LAYOUTS)
    users: dict = {}  # bias -> weights it is added to
    other: set = set()

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            site = _site_call(func, args, kwargs or {}, ids)
            if site is not None:
                w, b, layout = site
                if found.setdefault(w, (b, layout)) != (b, layout):
                    other.add(w)  # used in two ways: not one linear map
                if b is not None:
                    users.setdefault(b, set()).add(w)
            elif not _metadata_only(func):
                for a in list(args) + list((kwargs or {}).values()):
                    for t in (a if isinstance(a, (list, tuple)) else (a,)):
                        if isinstance(t, torch.Tensor) and id(t) in ids:
                            other.add(ids[id(t)])
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Spy():
        call(x)
    # a bias exact only when it is added by exactly one weight's products and used no other way
    return {w: (b, t) for w, (b, t) in found.items()
            if w not in other and named[w].dim() in (2, 3) and w not in users
            and (b is None or (b not in other and b not in found and len(users.get(b, ())) == 1))}


class SiteRecorder:
    """A TorchFunctionMode for the capture forward: each call through a planned :class:`MatmulSite` is
    recorded (input, output, version counters) like a module hook records a layer's call (``b``: the block's
    examples, for products whose rows merge batch and positions: :meth:`MatmulSite.record`)."""

    def __init__(self, plans: list, b: int | None = None):
        by_name = {p.module._names[0]: p for p in plans}
        ids = {id(p.module.weight): name for name, p in by_name.items()}
        bias_ids = {id(p.module.bias): p.module._names[1] for p in plans if p.module.bias is not None}

        class Recorder(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                site = _site_call(func, args, kwargs or {}, {**ids, **bias_ids})
                p = by_name.get(site[0]) if site is not None else None
                if p is None or site[2] != p.module.layout:
                    return func(*args, **(kwargs or {}))
                x, out, given = p.module.record(func, args, b)
                x = x.detach()
                p.inputs.append(x.clone() if p.copy_input else x)
                p.outputs.append(out)
                p.versions.append((x._version, out._version))
                return given.clone() if p.copy_output else given

        self.mode = Recorder()


def capture_modules(model: nn.Module, sites: dict | None = None) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` plus the :class:`InProjection` of each unrollable attention module
    (named ``<attention>.in_proj``) and the :class:`RecurrentProjection` maps of each unrollable recurrent
    module (``<rnn>.ih_l0``, ``<rnn>.hh_l0``, ...), and the :class:`MatmulSite` of each of ``sites``
    (``<weight>:matmul``)."""
    out = []
    for name, m in model.named_modules():
        out.append((name, m))
        if unrollable(m):
            out.append((f"{name}.in_proj" if name else "in_proj", in_projection(m)))
        if unrollable_recurrent(m):
            out.extend(((f"{name}.{key}" if name else key), site) for key, site in recurrent_projections(m).items())
    out.extend((f"{w}:matmul", site) for w, site in matmul_sites(model, sites or {}).items())
    return out


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
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    # In-place safety: a later in-place op (ReLU(inplace=True), ``out += identity``) on a captured input or
    # output would change what the layer's gradient is computed from. Capture records the tensors' version
    # counters; when one moved, the layer captures a copy of its input / hands the model a copy of its output
    # (so the captured tensor stays the one the layer's backward sees) and the block is captured again.
    copy_input: bool = False
    copy_output: bool = False
    versions: list = field(default_factory=list)
    costs: dict | None = None  # the cost model's flops per example pair for each form (set with ``form``)
    # the parameters reach the layer's effective (weight, bias) through an example-independent map; per-example
    # gradients of the effective weight go through it by one batched vector-Jacobian product (materialized):
    # "parametrize": torch.nn.utils.parametrize (weight norm, orthogonal, spectral norm), the originals;
    # "affine": a Linear subclass computing W(theta) in its forward (found out by the layer check), whose
    # effective map is read off the module itself (affine_map); False: the plain weight
    weight_map: str | bool = False

    def __post_init__(self):
        self.kind = LayerKind(self.kind)

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


def check_per_example(model: nn.Module) -> None:
    """Refuse modules whose output for one example depends on the rest of the batch."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training or not m.track_running_stats or m.running_mean is None:
                raise ValueError(
                    f"{name or type(m).__name__} ({type(m).__name__}) normalizes with batch statistics "
                    "(train mode or no running stats), so each example's output depends on the others and "
                    "the per-example tangent kernel is ill-defined: call model.eval() (with running stats)"
                )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"{name or type(m).__name__} is an active dropout: the network is random, so its tangent "
                "kernel is ill-defined: call model.eval() (or set p=0)"
            )


def check_probe_inputs(call, x: torch.Tensor, *, sample: int | None = 16, params: list | None = None) -> None:
    """Guards every NTK implementation runs before its first block (naive included).

    Non-finite inputs or outputs are errors; so is a model whose output for an example depends on the rest
    of the batch: the outputs of a random half, in a random order, of ``b`` examples must equal those of
    the same examples within all ``b`` (batch statistics, order-dependent mixing and per-batch randomness
    all change them). With ``params``, the gradients too: the gradient of a random combination
    ``sum_i w_i v . f(x_i)`` over that half must be the same computed in the forward of all ``b`` as in the
    forward of the half alone, which a term such as ``y + (y - y.detach()).mean(0)`` (the same values,
    gradients mixed over the batch) fails. Costs two forwards of ``b + b / 2`` examples (with grad and two
    backward passes when ``params`` is given), without tf32.

    The tolerance is relative to the largest output (gradient): a GPU picks different convolution algorithms
    for the two batch sizes, whose rounding differs (the paper's ResNet18 at init on an H100 failed the earlier
    absolute 1e-5), while mixing changes outputs by O(1) of their scale.

    Args:
        call: the model as a function of a batch ``[b, ...] -> [b, ...]``.
        x: the examples ``[n, ...]``.
        sample: ``b``, examples checked (``min(n, sample)``); None: all ``n`` (the engine passes each block
            size it uses, so a model that mixes only in large batches is found).
        params: the trainable parameters whose gradients are compared (None: outputs only).

    Raises:
        ValueError: non-finite inputs or outputs, or outputs or gradients that depend on other examples.
    """
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("the probe inputs contain NaN/inf: the tangent kernel is undefined")
    b = x.shape[0] if sample is None else min(x.shape[0], sample)
    grads = params is not None and b >= 2
    with exact_fp32():
        g = torch.Generator().manual_seed(b)
        pick = torch.randperm(x.shape[0], generator=g)[:b].to(x.device)
        xb = x[pick]
        with torch.set_grad_enabled(grads):
            full = tensor_output(call(xb)).reshape(b, -1)
        if not bool(torch.isfinite(full.detach()).all()):
            raise ValueError("the model's outputs contain NaN/inf on the probe set: the tangent kernel is undefined")
        if b < 2:
            return
        sub = torch.randperm(b, generator=g)[: max(1, b // 2)].to(x.device)  # a random half, shuffled
        with torch.set_grad_enabled(grads):
            part = tensor_output(call(xb[sub])).reshape(sub.numel(), -1)
        ref = full.detach()[sub]
        tol = 1e-7 if ref.dtype == torch.float64 else 1e-3 if ref.dtype == torch.float32 else 3e-2  # 16-bit: ~eps x 8
        if part.shape != ref.shape or not torch.allclose(part.detach(), ref, rtol=tol,
                                                         atol=tol * (1e-3 + float(ref.abs().max()))):
            raise ValueError(
                "the model's output for an example depends on the other examples of the batch (a module mixes "
                "examples, e.g. BatchNorm with batch statistics, or is random): the per-example tangent kernel "
                "is ill-defined. It was measured in eval mode already (dropout off, BatchNorm on running "
                "statistics), so the mixing is in the model itself: remove or replace the module that mixes")
        if not grads or not (full.requires_grad and part.requires_grad):
            return
        wv = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(ref.device, ref.dtype)  # [b/2, k]
        within = torch.autograd.grad((full[sub] * wv).sum(), params, allow_unused=True)
        alone = torch.autograd.grad((part * wv).sum(), params, allow_unused=True)
    within = torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(within, params)])
    alone = torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(alone, params)])
    if not torch.allclose(within, alone, rtol=tol, atol=tol * (1e-3 + float(alone.abs().max()))):
        raise ValueError(
            "the model's gradient for an example depends on the other examples of the batch while its outputs "
            "do not (e.g. a term such as (y - y.detach()).mean(0)): the per-example tangent kernel is ill-defined; "
            "remove the term that mixes the gradients of examples")


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


_DIRECT: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


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
    if m not in _DIRECT:
        p = m.weight
        with torch.no_grad():
            _DIRECT[m] = direct_linear(m, torch.zeros(1, m.in_features, dtype=p.dtype, device=p.device)) is not None
    return _DIRECT[m]


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
        if not isinstance(m, _LINEAR_TYPES + (InProjection, RecurrentProjection)) or id(m) in excluded:
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
        if isinstance(m, _CONV_TRANSPOSE):
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
        plans.append(LayerPlan(name, m, kind, use_w, use_b, weight_map=mapped and use_w))
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


# --- factors from captured inputs and output gradients --------------------------------------------
def _conv_patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[b, G, C_in/G * prod(kernel), L] patches of a convolution's input, in the weight's layout."""
    if isinstance(m, nn.Conv3d):  # no 3-d unfold: the position-major patches, columns reordered (c, k...)
        pos = conv_patches_by_position(m, x)  # [b, S, G, k... c]
        b, S, G, _ = pos.shape
        cg = m.in_channels // m.groups
        v = pos.view(b, S, G, -1, cg).permute(0, 2, 4, 3, 1)  # [b, G, c, k, S]
        return v.reshape(b, G, -1, S)
    if isinstance(m, nn.Conv1d):
        x = x.unsqueeze(2)
        ks, st, dl = (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
        pad = (0, m.padding[0]) if not isinstance(m.padding, str) else m.padding
    else:
        ks, st, dl = m.kernel_size, m.stride, m.dilation
        pad = m.padding
    if isinstance(pad, str) or m.padding_mode != "zeros":
        # explicit padding exactly as the module does it ('same' may be asymmetric; reflect/circular modes)
        rp = list(m._reversed_padding_repeated_twice)
        if isinstance(m, nn.Conv1d):
            rp = rp + [0, 0]
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, rp, mode=mode) if any(rp) else x
        pad = (0, 0)
    cols = F.unfold(x, ks, dilation=dl, padding=pad, stride=st)  # [b, C_in * kh * kw, L]
    b, _, L = cols.shape
    return cols.view(b, m.groups, -1, L)


def strided_patches(x: torch.Tensor, ks, st, dl, G: int, out=None) -> torch.Tensor:
    """``[B, S, G, prod(ks) * C/G]`` patches of an already padded ``x`` ``[B, C, *spatial]`` (any number of
    spatial dims), position-major, columns in ``(k..., c)`` order: one strided view, one copy. ``out``: the
    number of windows per dim (default: all that fit)."""
    B, C, *sp = x.shape
    nd = len(sp)
    strides = x.stride()
    if out is None:
        out = [(sp[i] - dl[i] * (ks[i] - 1) - 1) // st[i] + 1 for i in range(nd)]
    Cg = C // G
    shape = (B, *out, G, *ks, Cg)
    stride = (strides[0], *(strides[2 + i] * st[i] for i in range(nd)), strides[1] * Cg,
              *(strides[2 + i] * dl[i] for i in range(nd)), strides[1])
    v = x.as_strided(shape, stride, x.storage_offset())
    S, K = 1, 1
    for i in range(nd):
        S, K = S * out[i], K * ks[i]
    return v.reshape(B, S, G, K * Cg)


def conv_patches_by_position(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[b, S, G, prod(kernel) * C_in/G]`` patches of a Conv1d/2d/3d's input, position-major, with columns in
    ``(k..., c)`` order.

    One strided copy of the (padded) input in its own memory layout: for a channels-last input each
    patch row is a few contiguous runs of channels (no transposes, unlike ``unfold``'s ``[b, C k k, S]``).
    """
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        # explicit padding exactly as the module does it ('same' may be asymmetric; reflect/circular modes)
        rp = list(m._reversed_padding_repeated_twice)
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, rp, mode=mode) if any(rp) else x
    elif any(m.padding):
        x = F.pad(x, [p for p in reversed(m.padding) for _ in (0, 1)])
    return strided_patches(x, m.kernel_size, m.stride, m.dilation, m.groups)


def convT_dims(m) -> tuple[int, int, int]:
    """``(G, d_in, d_out)`` of a transposed convolution's weight factors: input channels per group against
    ``kernel positions x output channels per group``."""
    G = m.groups
    ks = 1
    for k_ in m.kernel_size:
        ks *= k_
    return G, m.in_channels // G, ks * (m.out_channels // G)


def convT_g_patches(m, g: torch.Tensor, spatial) -> torch.Tensor:
    """Output gradients ``[B, C_out, *out]`` of a transposed convolution as the patches its adjoint
    convolution (same weight, stride, padding, dilation) reads at each of the input's positions
    ``spatial``: ``[B, S, G, prod(kernel) * C_out/G]`` (columns ``(k..., c)``). ``output_padding`` may leave
    room for more windows in the padded gradient: only the input's ``spatial`` are taken."""
    if any(m.padding):
        g = F.pad(g, [p for p in reversed(m.padding) for _ in (0, 1)])
    return strided_patches(g, m.kernel_size, m.stride, m.dilation, m.groups, out=list(spatial))


def position_a(plan: LayerPlan, x: torch.Tensor) -> torch.Tensor:
    """Layer input of one call, position-major: ``[b, S, G, d_in']`` (a column of ones for a bias)."""
    m = plan.module
    if plan.kind == "convT":
        G, din, _ = convT_dims(m)
        return x.flatten(2).transpose(1, 2).reshape(x.shape[0], -1, G, din)
    if plan.kind == "linear":
        a = x.reshape(x.shape[0], -1, getattr(m, "groups", 1), m.in_features)
    else:
        a = conv_patches_by_position(m, x)
    if not plan.use_bias:
        return a
    ones = a.new_ones(a.shape[:3] + (1,))
    return torch.cat([a, ones], 3) if plan.use_weight else ones


def position_g(plan: LayerPlan, g: torch.Tensor, spatial=None) -> torch.Tensor:
    """One output's gradient at one call's output, position-major: ``[b, S, G, d_out]`` (``spatial``: the
    call's input positions, for a transposed convolution)."""
    m = plan.module
    b = g.shape[0]
    if plan.kind == "convT":
        return convT_g_patches(m, g, spatial)
    if plan.kind == "linear":
        return g.reshape(b, -1, getattr(m, "groups", 1), m.out_features)
    return g.flatten(2).transpose(1, 2).reshape(b, -1, m.groups, m.out_channels // m.groups)


def position_to_factor_layout(plan: LayerPlan, full: torch.Tensor) -> torch.Tensor:
    """A summed gradient ``[G, d_out, d_in']`` with conv columns in ``(kh, kw, c)`` order to the
    ``(c, kh, kw)`` order of the weight (what :func:`split_params` expects)."""
    m = plan.module
    if plan.kind != "conv" or not plan.use_weight:
        return full
    G, do = full.shape[:2]
    ks = tuple(m.kernel_size)
    cg = m.in_channels // m.groups
    nw = cg
    for k_ in ks:
        nw *= k_
    nd = len(ks)
    w = full[..., :nw].reshape(G, do, *ks, cg).permute(0, 1, nd + 2, *range(2, nd + 2)).reshape(G, do, nw)
    return torch.cat([w, full[..., nw:]], -1) if full.shape[-1] > nw else w


def linear_a(plan: LayerPlan, x: torch.Tensor) -> torch.Tensor:
    """Layer input of one call as ``[b, G, d_in', S]`` (a row of ones appended for a bias)."""
    m = plan.module
    if plan.kind == "convT":
        return position_a(plan, x).permute(0, 2, 3, 1)
    if plan.kind == "linear":  # [b, ..., S, G, d_in] -> [b, G, d_in, S]
        a = x.reshape(x.shape[0], -1, getattr(m, "groups", 1), m.in_features).permute(0, 2, 3, 1)
    else:
        a = _conv_patches(m, x)
    if not plan.use_bias:
        return a
    ones = a.new_ones(a.shape[:2] + (1, a.shape[3]))
    return torch.cat([a, ones], 2) if plan.use_weight else ones


def linear_g(plan: LayerPlan, gk: torch.Tensor, spatial=None) -> torch.Tensor:
    """Output gradients of one call ``[b, k, ...out]`` as ``[b, k, G, d_out, S]`` (``spatial``: the call's
    input positions, for a transposed convolution)."""
    m = plan.module
    b, k = gk.shape[:2]
    if plan.kind == "convT":
        pg = convT_g_patches(m, gk.reshape(b * k, *gk.shape[2:]), spatial)  # [b k, S, G, d_out]
        return pg.view(b, k, *pg.shape[1:]).permute(0, 1, 3, 4, 2)
    if plan.kind == "linear":  # [b, k, ..., S, G, d_out] -> [b, k, G, d_out, S]
        return gk.reshape(b, k, -1, getattr(m, "groups", 1), m.out_features).permute(0, 1, 3, 4, 2)
    G = m.groups
    return gk.reshape(b, k, G, m.out_channels // G, -1)


def linear_factors(plan: LayerPlan, grads: list[torch.Tensor]):
    """Natural layouts over all calls of the module (positions of the calls concatenated):
    a ``[b, G, d_in', S]`` and g ``[b, k, G, d_out, S]``."""
    a_calls = [linear_a(plan, x) for x in plan.inputs]
    g_calls = [linear_g(plan, gk, x.shape[2:]) for gk, x in zip(grads, plan.inputs)]
    a = torch.cat(a_calls, -1) if len(a_calls) > 1 else a_calls[0]
    g = torch.cat(g_calls, -1) if len(g_calls) > 1 else g_calls[0]
    return a, g


def ghost_layout(a: torch.Tensor, g: torch.Tensor):
    """Natural layouts to the ghost form's ``a [b, S, G, d_in]``, ``g [b, k, S, G, d_out]`` (views)."""
    return a.permute(0, 3, 1, 2), g.permute(0, 1, 4, 2, 3)


def embedding_factors(plan: LayerPlan, grads):
    """(idx [b, S], g [b, k, S, 1, D]) over all calls."""
    m = plan.module
    idx_calls, g_calls = [], []
    for idx, gk in zip(plan.inputs, grads):
        b, k = gk.shape[:2]
        idx = idx.reshape(b, -1)
        g = gk.reshape(b, k, -1, 1, m.embedding_dim)
        if m.padding_idx is not None:  # embedding backward gives no gradient to padding_idx
            g = g * (idx != m.padding_idx).to(g.dtype)[:, None, :, None, None]
        idx_calls.append(idx)
        g_calls.append(g)
    idx = torch.cat(idx_calls, 1) if len(idx_calls) > 1 else idx_calls[0]
    g = torch.cat(g_calls, 2) if len(g_calls) > 1 else g_calls[0]
    return idx, g


def normalized_inputs(plan: LayerPlan) -> list:
    """Per call of a norm layer: its normalized input ``xhat`` (None for a transposed convolution's bias plan),
    which the weight's per-example gradient multiplies (computed once per block, for every output)."""
    m = plan.module
    out = []
    for x in plan.inputs:
        if isinstance(m, nn.LayerNorm):
            out.append(F.layer_norm(x, m.normalized_shape, eps=m.eps))
        elif isinstance(m, nn.GroupNorm):
            out.append(F.group_norm(x, m.num_groups, eps=m.eps))
        elif isinstance(m, _CONV_TRANSPOSE):
            out.append(None)
        elif hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
            out.append(F.rms_norm(x, m.normalized_shape, eps=m.eps))
        else:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out.append((x - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps))
    return out


def norm_grads(plan: LayerPlan, grads, xhats: list | None = None) -> torch.Tensor:
    """Materialized per-example gradients [b, k, P] of a norm layer's affine parameters (``xhats``: its
    :func:`normalized_inputs`, when already at hand)."""
    m = plan.module
    total = None
    if xhats is None:
        xhats = normalized_inputs(plan)
    for xhat, gk in zip(xhats, grads):
        b, k = gk.shape[:2]
        if isinstance(m, nn.LayerNorm):
            red = tuple(range(2, gk.dim() - len(m.normalized_shape)))  # leading (position) dims, after [b, k]
        elif hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
            red = tuple(range(2, gk.dim() - len(m.normalized_shape)))
        else:  # GroupNorm, BatchNorm, a transposed convolution's bias: per channel
            red = tuple(range(3, gk.dim()))
        parts = []
        if plan.use_weight:
            gw = gk * xhat.unsqueeze(1)
            parts.append((gw.sum(red) if red else gw).reshape(b, k, -1))
        if plan.use_bias:
            parts.append((gk.sum(red) if red else gk).reshape(b, k, -1))
        cur = torch.cat(parts, -1)
        total = cur if total is None else total + cur
    return total


# --- cost model -------------------------------------------------------------------------------------
# A strided permute of the ghost form's [b S d_out, b k] intermediate, in flops an element. The intermediate comes
# from a batched GEMM whose inner dimension is the other block's positions (often 16-64: memory-bound), and is then
# copied once in memory; both scale with its size. 32 (one measured copy beside GEMMs at ~30 GFLOP/s) still chose
# ghost where it lost; 128, measured on the 2-core CPU, full kernel, median of 5, 32 -> 128: torchvision
# mobilenet_v3_small (n = 8) 336 -> 222 ms, ViT-tiny (n = 32) 76 -> 60 ms, the plain CNN (n = 64)
# 656 -> 510 ms; resnet18, squeezenet, the text transformer, cnn3 (n = 256) and resnet18_w16 unchanged (+-3%).
GHOST_PERMUTE_FLOPS = 128


def form_costs(G: int, din: int, S: int, k: int, dout: int, kernel: str, pairs_per_example: float = 0.0) -> dict:
    """The cost model of one linear / convolution layer (``G`` groups, ``S`` positions, ``d_in``, ``d_out``,
    ``k`` outputs), in flops.

    Per example pair: ghost ``G S^2 (d_in + k d_out)`` (trace; the full kernel's H contraction costs
    ``G S k d_out (S + k)``), materialized ``k G d_in d_out`` (``k^2`` for the full kernel). Forming the
    materialized gradients costs ``k G S d_in d_out`` per example (``forming``), amortized over
    ``pairs_per_example`` (about n / 2 for n examples; 0 ignores it) in ``materialized``. ``forward``: the
    layer's flops an example, for ``implementation="auto"``'s comparison with a whole-model Jacobian.
    """
    forming = k * G * S * din * dout  # per example: k backward products of the layer's weight
    if kernel == "full":
        # with positions, the ghost product's intermediate H (S k d_out per pair) is permuted once in memory:
        # a strided copy, charged GHOST_PERMUTE_FLOPS flops an element
        ghost = G * (S * S * din + (S * k * dout * (S + k + GHOST_PERMUTE_FLOPS) if S > 1 else k * k * dout))
        pair = k * k * G * din * dout
    else:
        ghost = G * S * S * (din + k * dout)
        pair = k * G * din * dout
    materialized = pair + (forming / pairs_per_example if pairs_per_example > 0 else 0.0)
    return {"ghost": float(ghost), "materialized": float(materialized), "materialized_pair": float(pair),
            "forming": float(forming), "forward": float(G * S * din * dout), "dims": (G, din, S, k, dout)}


def embedding_costs(S: int, V: int, D: int, k: int, pairs_per_example: float = 0.0) -> dict:
    """The cost model of an embedding (``V`` rows of width ``D`` looked up at ``S`` positions), full kernel, in
    flops: ghost ``S^2`` index comparisons plus the positions' product as for a linear layer; materialized
    ``k^2 V D`` a pair, plus zeroing and scattering the ``[k, V D]`` gradients of each example (``forming``)."""
    ghost = S * S + (S * k * D * (S + k + GHOST_PERMUTE_FLOPS) if S > 1 else k * k * D)
    pair = k * k * V * D
    forming = k * V * D + k * S * D
    materialized = pair + (forming / pairs_per_example if pairs_per_example > 0 else 0.0)
    return {"ghost": float(ghost), "materialized": float(materialized), "materialized_pair": float(pair),
            "forming": float(forming), "forward": float(S * D)}


def embedding_materialized(idx: torch.Tensor, g: torch.Tensor, V: int) -> torch.Tensor:
    """Per-example gradients ``[b, k, V D]`` of an embedding from its indices ``[b, S]`` and output gradients
    ``g`` ``[b, k, S, 1, D]`` (padding positions already zero): one scatter-add of every position's gradient into
    its row."""
    b, k, S, _, D = g.shape
    buf = g.new_zeros(b * V, k, D)
    rows = (idx + V * torch.arange(b, device=idx.device)[:, None]).reshape(-1)  # [b S] rows of the flat buffer
    buf.index_add_(0, rows, g[:, :, :, 0].permute(0, 2, 1, 3).reshape(b * S, k, D))
    return buf.view(b, V, k, D).permute(0, 2, 1, 3).reshape(b, k, V * D)


def choose_form(plan: LayerPlan, G: int, din: int, S: int, k: int, dout: int, kernel: str,
                pairs_per_example: float = 0.0) -> str:
    """Ghost or materialized, whichever needs fewer flops by :func:`form_costs` (ties: materialized); the
    figures are kept in ``plan.costs``."""
    if plan.kind == "embedding":  # din: the vocabulary, dout: the embedding width
        if kernel != "full":
            return "ghost"  # (the one-block trace path reduces embeddings in ghost form only)
        plan.costs = embedding_costs(S, din, dout, k, pairs_per_example)
        return "ghost" if plan.costs["ghost"] < plan.costs["materialized"] else "materialized"
    if plan.kind == "norm" or plan.weight_map:
        return "materialized"
    plan.costs = form_costs(G, din, S, k, dout, kernel, pairs_per_example)
    return "ghost" if plan.costs["ghost"] < plan.costs["materialized"] else "materialized"


def to_materialized(a: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example gradients ``[b, k, G * d_out * d_in]`` from natural layouts (sum over positions).

    For G = 1 this is one batched GEMM ``[k d_out, S] @ [S, d_in]`` per example on the layouts the
    convolution already produced (no permuted copies).
    """
    b, k, G, do, S = g.shape
    if G == 1:
        din = a.shape[2]
        if out is not None:  # into a caller's (reused) buffer: no fresh pages for every layer
            return torch.bmm(g.reshape(b, k * do, S), a.reshape(b, -1, S).transpose(1, 2),
                             out=out.view(b, k * do, din)).view(b, k, -1)
        return torch.bmm(g.reshape(b, k * do, S), a.reshape(b, -1, S).transpose(1, 2)).view(b, k, -1)
    return torch.einsum("bkgos,bgis->bkgoi", g, a).reshape(b, k, -1)


# Rows of a batched vector-Jacobian product taken at once: about 8 MB of float32 per chunk. Measured (2-core CPU,
# the VJP of W / ||W||_row for 640 rows of a 256 x 256 weight): 377 ms in one batch, 140 ms in chunks of 32 rows.
VJP_CHUNK_ELEMENTS = 1 << 21


def _batched_vjp(outputs: tuple, inputs: list, grads: tuple, extra: int = 0) -> torch.Tensor:
    """``[R, sum(numel(input)) + extra]``: the vector-Jacobian products of ``outputs`` for the ``R`` rows of
    ``grads``, each input's flattened in ``inputs`` order (one batched backward; one backward per row where an
    op has no batching rule), then ``extra`` columns left for the caller. Unused inputs get zeros. The chunks'
    results are written into that one buffer: no concatenation over chunks, then over parameters (two copies
    of the whole ``[R, P]`` before; 25% of a cosine MLP's trace kernel)."""
    R = grads[0].shape[0]
    sizes = [t.numel() for t in inputs]
    flat = grads[0].new_empty(R, sum(sizes) + extra)
    per_row = sum(g[0].numel() for g in grads) + sum(sizes)
    chunk = max(1, min(R, VJP_CHUNK_ELEMENTS // max(1, per_row)))

    def put(rows: slice, got) -> None:
        off = 0
        for g, n in zip(got, sizes):
            dst = flat[rows, off: off + n]
            dst.zero_() if g is None else dst.copy_(g.reshape(dst.shape))
            off += n

    try:
        # rows in cache-sized chunks: each op of the batched backward then streams from cache, not memory
        for s in range(0, R, chunk):
            put(slice(s, s + chunk), torch.autograd.grad(
                outputs, inputs, tuple(g[s:s + chunk] for g in grads), is_grads_batched=True, allow_unused=True,
                retain_graph=True))
    except RuntimeError:
        for r in range(R):
            put(slice(r, r + 1), torch.autograd.grad(outputs, inputs, tuple(g[r] for g in grads), retain_graph=True,
                                                     allow_unused=True))
    return flat


def _split_rows(flat: torch.Tensor, like: list) -> list[torch.Tensor]:
    """Views ``[R, *t.shape]`` of :func:`_batched_vjp`'s columns, one per tensor of ``like``."""
    out, off = [], 0
    for t in like:
        out.append(flat[:, off: off + t.numel()].view(flat.shape[0], *t.shape))
        off += t.numel()
    return out


@torch.enable_grad()
def through_parametrization(m: nn.Module, grads: torch.Tensor) -> list[torch.Tensor]:
    """Gradients ``[R, *weight.shape]`` with respect to a parametrized module's effective weight, mapped to
    its parametrization's originals: ``[R, *original.shape]`` each, by one batched vector-Jacobian product
    of ``weight(originals)`` (exact: the map does not depend on the example)."""
    return _split_rows(_parametrized_flat(m, grads), list(m.parametrizations.weight.parameters()))


@torch.enable_grad()
def _parametrized_flat(m: nn.Module, grads: torch.Tensor, extra: int = 0) -> torch.Tensor:
    """:func:`through_parametrization` as one ``[R, numel(originals) + extra]`` buffer."""
    # m.weight: recomputed from the originals
    return _batched_vjp((m.weight,), list(m.parametrizations.weight.parameters()), (grads,), extra)


@torch.enable_grad()
def affine_map(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The effective ``(W [d_out, d_in], b [d_out] or None)`` of a module computing an affine map of its
    input, as differentiable functions of its parameters: the operands of its one direct ``F.linear`` call
    where :func:`direct_linear` finds one (their VJP costs about a materialized row), else read off the
    module's outputs, ``b = m(0)``, ``W = (m(I) - b)^T``. Whether the module is affine with
    example-independent (W, b) is what the layer check confirms."""
    din = m.weight.shape[1]
    p = m.weight
    direct = direct_linear(m, torch.zeros(1, din, dtype=p.dtype, device=p.device))
    if direct is not None:
        return direct
    basis = torch.cat([torch.zeros(1, din, dtype=p.dtype, device=p.device),
                       torch.eye(din, dtype=p.dtype, device=p.device)])
    out = m(basis)  # [1 + d_in, d_out]
    return (out[1:] - out[:1]).T, out[0]


@torch.enable_grad()
def through_affine(m: nn.Module, rows: torch.Tensor, flat: bool = False):
    """Gradients ``[R, d_out, d_in + 1]`` with respect to the effective (W | b) of :func:`affine_map`, mapped
    to the module's own trainable parameters (``[R, *shape]`` each, in ``named_parameters`` order; with
    ``flat``, one ``[R, P]`` buffer in that order) by one batched vector-Jacobian product."""
    W, b = affine_map(m)
    own = [t for _, t in m.named_parameters() if t.requires_grad]
    outs, grads = [W], [rows[..., :-1]]  # (strided views: each chunk is read once by the batched backward)
    if b is not None and b.requires_grad:  # no bias, or a constant one: the bias column maps to nothing
        outs.append(b)
        grads.append(rows[..., -1])
    got = _batched_vjp(tuple(outs), own, tuple(grads))
    return got if flat else _split_rows(got, own)


def map_parametrized_rows(plan: LayerPlan, F: torch.Tensor) -> torch.Tensor:
    """Per-example gradients ``[..., d_out * (d_in + bias)]`` of a parametrized Linear (natural layout: each
    output row's inputs then its bias) -> ``[..., numel(originals) + d_out]`` in :meth:`LayerPlan.params`
    order."""
    m = plan.module
    lead = F.shape[:-1]
    do, din = m.weight.shape
    rows = F.reshape(-1, do, din + (1 if plan.use_bias else 0))
    if plan.weight_map == "affine":
        return through_affine(m, rows, flat=True).reshape(*lead, -1)
    out = _parametrized_flat(m, rows[..., :din], do if plan.use_bias else 0)
    if plan.use_bias:
        out[:, out.shape[1] - do:] = rows[..., din]
    return out.reshape(*lead, -1)


def split_params(plan: LayerPlan, full: torch.Tensor) -> list[torch.Tensor]:
    """A summed gradient in factor layout ``[G, d_out, d_in']`` as the parameters' shapes."""
    m = plan.module
    if plan.weight_map == "affine":
        do, din = m.weight.shape
        return [t[0] for t in through_affine(m, full.reshape(1, do, din + 1))]
    if plan.kind == "convT":  # [G, (kh, kw, c_out), c_in] -> the weight's [C_in, C_out/G, kh, kw]
        G, din, _ = convT_dims(m)
        ks = tuple(m.kernel_size)
        w = full.reshape(G, *ks, m.out_channels // G, din)
        w = w.permute(0, len(ks) + 2, len(ks) + 1, *range(1, len(ks) + 1))
        return [w.reshape(m.weight.shape)]
    out = []
    if plan.use_weight and isinstance(m, MatmulSite) and m.transposed:  # h @ W: W is [(G,) d_in, d_out]
        w = full[..., : full.shape[-1] - (1 if plan.use_bias else 0)]
        out.append(w.reshape(m.groups, m.out_features, m.in_features).transpose(1, 2).reshape(m.weight.shape))
    elif plan.use_weight:
        w = full[..., : full.shape[-1] - (1 if plan.use_bias else 0)]
        if plan.weight_map:
            out.extend(t[0] for t in through_parametrization(m, w.reshape(1, *m.weight.shape)))
        else:
            out.append(w.reshape(m.weight.shape))
    if plan.use_bias:
        out.append(full[..., -1].reshape(m.bias.shape))
    return out


def batch_grad_from_factors(plan: LayerPlan, a, g_v) -> list[torch.Tensor]:
    """Sum over the block of per-example gradients, in the parameters' shapes.

    ``g_v``: output gradients of one (random) combination of the outputs, natural layout without the k
    axis (``[b, G, d_out, S]``; for an embedding ``[b, S, 1, D]``).
    """
    m = plan.module
    if plan.kind == "embedding":
        flat_g = g_v[:, :, 0].reshape(-1, m.embedding_dim)
        return [torch.zeros_like(m.weight).index_add_(0, a.reshape(-1), flat_g)]
    return split_params(plan, torch.einsum("bgos,bgis->goi", g_v, a))  # [G, d_out, d_in']


def _close(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether a layer check's gradient ``mine`` equals autograd's ``theirs`` (same shape; max error within
    1e-3 (16/32-bit) or 1e-8 (float64) of ``1 + max |theirs|``, times ``sqrt(rows)``)."""
    scale = float(theirs.abs().max()) if theirs.numel() else 0.0
    tol = (1e-3 if theirs.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8) * (1.0 + scale)
    return mine.shape == theirs.shape and float((mine - theirs).abs().max()) <= tol * max(1.0, mine.shape[0] ** 0.5)


# The layer check's random weights: the same draws on the tile path and the one-block trace path.
CHECK_SEED = 1234


def check_weights(b: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer check's random example weights ``w`` ``[b]`` and output weights ``v`` ``[k]`` (float64, CPU):
    one random combination ``sum_i w_i v . f(x_i)`` checks every layer at once; random example weights tell
    examples apart where a plain sum over examples would not (a batch that is not dim 0)."""
    gen = torch.Generator(device="cpu").manual_seed(CHECK_SEED)
    v = torch.randn(k, generator=gen, dtype=torch.float64)
    w = torch.randn(b, generator=gen, dtype=torch.float64)
    return w, v


def weighted_layer_grads(out: torch.Tensor, wv: torch.Tensor, plans: list) -> list[list[torch.Tensor]]:
    """What the layer check compares against, on both paths: autograd's gradient of
    ``sum_{i,a} wv[i, a] out[i, a]`` with respect to each plan's parameters (zeros where unused).

    Args:
        out: the model's outputs ``[b, k]`` (the capture's graph; freed by this backward).
        wv: the weights ``[b, k]`` (``w_i v_a`` from :func:`check_weights`).
        plans: the planned layers.

    Returns:
        Per plan, its parameters' gradients in :meth:`LayerPlan.params` order.
    """
    vparams = [t for p in plans for _, t in p.params()]
    gs = torch.autograd.grad((out * wv).sum(), vparams, allow_unused=True)
    flat = [torch.zeros_like(t) if g is None else g for g, t in zip(gs, vparams)]
    per, pos = [], 0
    for p in plans:
        n = len(p.params())
        per.append(flat[pos: pos + n])
        pos += n
    return per
