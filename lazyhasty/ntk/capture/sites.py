"""Capture sites: where a layer's input and output gradient are read when the model's own module cannot be hooked
as it is.

* :class:`InProjection` / :func:`unrolled_attention`: ``nn.MultiheadAttention``'s packed input projection as a
  hooked linear call per distinct input (query, key, value);
* :class:`RecurrentProjection` / :func:`unrolled_recurrent`: the input and hidden maps of ``nn.LSTM`` /
  ``nn.GRU`` / ``nn.RNN``, one hooked call per time step;
* :class:`MatmulSite` / :func:`discover_sites` / :class:`SiteRecorder`: parameters the model's own code
  multiplies directly (``h @ W``, ``torch.addmm(b, h, W)``, ``F.linear``, per-head ``[H, d_in, d_out]``), in the
  layouts of :data:`SITE_LAYOUTS`;
* :func:`capture_modules`: the modules to hook, in forward order.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .caches import IN_PROJECTIONS, RECURRENT, SITES


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


def in_projection(attention: nn.MultiheadAttention) -> InProjection:
    """The one :class:`InProjection` of an attention module (stable, so exclusions by id stick)."""
    proj = IN_PROJECTIONS.get(attention)
    if proj is None:
        proj = IN_PROJECTIONS[attention] = InProjection(attention)
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


def recurrent_projections(rnn: nn.RNNBase) -> dict:
    """``{"ih_l0": RecurrentProjection, "hh_l0": ..., "ih_l0_reverse": ...}`` of an unrollable recurrent
    module (stable objects, so exclusions by id stick)."""
    got = RECURRENT.get(rnn)
    if got is None:
        got = {}
        for layer in range(rnn.num_layers):
            for sfx in ("", "_reverse")[: 2 if rnn.bidirectional else 1]:
                for kind in ("ih", "hh"):
                    key = f"{kind}_l{layer}{sfx}"
                    got[key] = RecurrentProjection(rnn, f"weight_{key}", f"bias_{key}" if rnn.bias else None)
        RECURRENT[rnn] = got
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
        # by its path (a walk down the module tree), not a dict of the whole model's parameters a read: the
        # weight and bias are read at every recorded call (HF GPT-2: 14 ms of a 46 ms first call)
        return self._owner().get_parameter(name)

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


def matmul_sites(model: nn.Module, specs: dict) -> dict:
    """``{weight name: MatmulSite}`` for ``specs`` ``{weight name: (bias name | None, layout)}`` (stable
    objects per model and spec, so exclusions by id stick)."""
    cache = SITES.setdefault(model, {})
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


def metadata_only(func) -> bool:
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
            elif not metadata_only(func):
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
    recorded (input, output, version counters) into its plan's :class:`~.captured.Calls` like a module hook
    records a layer's call (``sites``: ``(plan, calls)`` pairs; ``b``: the block's examples, for products whose
    rows merge batch and positions: :meth:`MatmulSite.record`)."""

    def __init__(self, sites: list, b: int | None = None):
        by_name = {p.module._names[0]: (p, calls) for p, calls in sites}
        ids = {id(p.module.weight): name for name, (p, _) in by_name.items()}
        bias_ids = {id(p.module.bias): p.module._names[1] for p, _ in sites if p.module.bias is not None}

        class Recorder(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                site = _site_call(func, args, kwargs or {}, {**ids, **bias_ids})
                p, calls = by_name.get(site[0], (None, None)) if site is not None else (None, None)
                if p is None or site[2] != p.module.layout:
                    return func(*args, **(kwargs or {}))
                x, out, given = p.module.record(func, args, b)
                calls.record(p, x, out)
                return calls.hand_on(p, given)

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
