"""Capture rules, one per :class:`LayerKind`: what a planned layer's captured calls become.

A rule turns one layer's captured calls (a :class:`~.captured.Calls` of the capture forward's
:class:`~.captured.Captured`) and output gradients into

* on the tile path, a feature object (``forms``: ghost or materialized) and, on an unverified block, the
  layer check's gradient ``sum_i w_i v . J_i`` in the parameters' shapes (:meth:`Rule.tile_feature`);
* on the one-block trace path (``forms.trace_block``), per block a state (:meth:`Rule.trace_state`), per output
  its kernel terms (:meth:`Rule.trace_output`), and at the end the check's gradient (:meth:`Rule.trace_check`);
* the elements one example takes on the trace path (:meth:`Rule.trace_elements`, for its block size).

``featurize.Featurizer`` and ``forms.trace_block`` reach a layer only through :func:`rule_for`, so supporting a
new family of layers is a change in ``capture/`` alone: its plan (``plan.plan_layers`` names the kind), its
layouts (``layouts``) and its rule here, registered in :data:`RULES`.

Three rules cover the five kinds: :class:`PositionRule` (``linear``, ``conv``, ``convT``: ``y = W a + b`` at
each position, factors ``a [b, S, G, d_in]`` and ``g [b, k, S, G, d_out]``), :class:`EmbeddingRule` (index
factors) and :class:`NormRule` (elementwise affine parameters, always materialized ``[b, k, P]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..forms.ghost import GhostEmbedding, GhostLinear
from ..forms.materialized import Materialized
from .cost import choose_form
from .layouts import (
    convT_dims, embedding_factors, embedding_materialized, ghost_layout, linear_factors, linear_g, norm_grads,
    normalized_inputs, position_a, position_g, position_to_factor_layout, to_materialized,
)
from .maps import batch_grad_from_factors, map_parametrized_rows, split_params
from .captured import Calls
from .plan import LayerKind, LayerPlan


@dataclass(frozen=True)
class TileContext:
    """What a rule needs from the call on the tile path.

    Args:
        kernel: ``"full"`` / ``"trace"`` / ``"diagonal"`` (the cost model's products).
        pairs_per_example: example pairs a block's features enter, per example (the cost model's weight of
            forming against products).
        workspace: ``workspace(numel) -> Tensor``, a buffer reused for one streamed materialized feature, or
            None (each feature owns its memory: it is kept).
    """

    kernel: str
    pairs_per_example: float
    workspace: Callable[[int], torch.Tensor] | None = None


class Rule:
    """How one kind of planned layer is captured (see the module docstring); subclasses implement it all.

    Attributes:
        chooses_form: whether the cost model chooses its form (ghost or materialized) per layer; a rule that
            does not always materializes.
        default_form: the form ``explain()`` shows before the first block chose one.
    """

    chooses_form = True
    default_form = "materialized"

    def tile_feature(self, p: LayerPlan, c: Calls, g_calls: list, v: torch.Tensor | None, ctx: TileContext):
        """``(feature, mine)``: layer ``p``'s feature from its captured calls ``c`` and their output gradients
        ``g_calls`` (one ``[b, k, ...]`` per call) and, given the check's per-example output weights ``v`` ``[b, k]``, the check's gradient
        ``sum_{i,a} v[i, a] J_{i,a}`` as a list in the layout of :meth:`check_reference` (``mine`` None
        without ``v``)."""
        raise NotImplementedError

    def check_reference(self, theirs: list) -> list:
        """Autograd's gradients of the layer's parameters (``theirs``) laid out as :meth:`tile_feature`'s and
        :meth:`trace_check`'s ``mine``."""
        return theirs

    def trace_state(self, p: LayerPlan, c: Calls, k: int, pairs: float, K: torch.Tensor) -> dict:
        """Per block, from the layer's captured calls ``c``: what every output of the trace path reuses (the key ``"ghost"``, when present, holds a
        gathering ghost whose ``trace_upper_into`` adds its terms at the end); ``K``: the ``[b, b]`` kernel."""
        raise NotImplementedError

    def trace_output(self, p: LayerPlan, st: dict, g_calls: list, gram: Callable, workspace: Callable,
                     a_out: int, w: torch.Tensor | None):
        """Reduce output ``a_out``'s gradients ``g_calls`` (one ``[b, ...]`` per call) into the kernel
        (``gram(F)`` adds ``F F^T`` for a ``[b, P]`` materialized ``F``), or gather them in the state's ghost;
        with the check's example weights ``w`` ``[b]``, return what the check sums over outputs (see
        :meth:`trace_check`)."""
        raise NotImplementedError

    def trace_check(self, p: LayerPlan, st: dict, m, w: torch.Tensor) -> list:
        """The check's gradient in the layout of :meth:`check_reference` from ``m``, the ``v``-combination over
        outputs of :meth:`trace_output`'s returns."""
        raise NotImplementedError

    def trace_elements(self, p: LayerPlan, x: torch.Tensor, y: torch.Tensor, k: int, pairs: float):
        """``(elements, widest)`` one example's call ``x -> y`` keeps on the trace path beyond its output
        gradients (``widest``: its largest transient per-example gradient, which is not kept)."""
        return 0, 0


class PositionRule(Rule):
    """``linear`` / ``conv`` / ``convT``: ``y[s] = W a[s] + b`` at each position ``s`` of each group.

    The per-example gradient is ``sum_s g[s] a[s]^T``: ghost (the factors, :class:`GhostLinear`) or materialized
    (``[b, k, G d_out d_in']``, one batched GEMM), whichever the cost model finds cheaper."""

    def tile_feature(self, p, c, g_calls, v, ctx):
        a, g = linear_factors(p, c.inputs, g_calls)  # a [b, G, d_in', S], g [b, k, G, d_out, S]
        if p.form is None:
            p.form = choose_form(p, a.shape[1], a.shape[2], a.shape[3], g.shape[1], g.shape[3], ctx.kernel,
                                 ctx.pairs_per_example)
        F = None
        if p.form == "materialized":
            b, k, G, do, S = g.shape
            F = to_materialized(a, g, ctx.workspace(b * k * G * do * a.shape[2]) if ctx.workspace else None)
        mine = None
        if v is not None and F is not None:  # the per-example gradients are at hand: sum them
            mine = split_params(p, torch.einsum("bk,bkp->p", v, F).view(g.shape[2], g.shape[3], -1))
        elif v is not None:
            # contract v with the [b, k, ...] gradients, then lay them out like g (without k)
            gv_calls = [torch.einsum("bk,bk...->b...", v, gk).unsqueeze(1) for gk in g_calls]
            gv = [linear_g(p, gk, x.shape[2:]) for gk, x in zip(gv_calls, c.inputs)]
            mine = batch_grad_from_factors(p, a, (torch.cat(gv, -1) if len(gv) > 1 else gv[0])[:, 0])
        if F is None:
            return GhostLinear(*ghost_layout(a, g)), mine
        return Materialized(map_parametrized_rows(p, F) if p.weight_map else F), mine

    @staticmethod
    def dout(p: LayerPlan) -> int:
        """Output width of one group at one position."""
        m = p.module
        if p.kind == LayerKind.CONVT:
            return convT_dims(m)[2]
        return m.out_features if p.kind == LayerKind.LINEAR else m.out_channels // m.groups

    def trace_state(self, p, c, k, pairs, K):
        a_calls = [position_a(p, xi) for xi in c.inputs]
        a = torch.cat(a_calls, 1) if len(a_calls) > 1 else a_calls[0]  # [b, S, G, din]
        if p.form is None:
            p.form = choose_form(p, a.shape[2], a.shape[3], a.shape[1], k, self.dout(p), "trace", pairs)
        return {"a": a, "ghost": GhostLinear.gathering(a, k, self.dout(p)) if p.form == "ghost" else None,
                "spatial": [x.shape[2:] for x in c.inputs]}  # each call's input positions (position_g)

    def trace_output(self, p, st, g_calls, gram, workspace, a_out, w):
        gp = [position_g(p, g, spatial) for g, spatial in zip(g_calls, st["spatial"])]
        g = torch.cat(gp, 1) if len(gp) > 1 else gp[0]  # [b, S, G, do]
        if st["ghost"] is not None:
            st["ghost"].set_output(a_out, g)
            return g
        a = st["a"]
        b, _, G, din = a.shape
        do = g.shape[3]
        if G == 1:
            F = torch.bmm(g[:, :, 0].transpose(1, 2), a[:, :, 0], out=workspace(b * do * din).view(b, do, din))
        else:
            F = torch.einsum("bsgo,bsgi->bgoi", g, a)
        F = F.reshape(b, -1)
        gram(map_parametrized_rows(p, F) if p.weight_map else F)
        return (w @ F).view(G, do, din) if w is not None else None  # the check needs only the weighted batch sum

    def trace_check(self, p, st, m, w):
        # m: the v-combination of batch-summed gradients [G, d_out, d_in'], or for ghost layers of
        # position-major gradients [b, S, G, d_out]
        full = m if st["ghost"] is None else torch.einsum("b,bsgo,bsgi->goi", w, m, st["a"])
        return split_params(p, position_to_factor_layout(p, full))

    def trace_elements(self, p, x, y, k, pairs):
        a = position_a(p, x)  # [1, S, G, din]
        dout = convT_dims(p.module)[2] if p.kind == LayerKind.CONVT else y.numel() // (a.shape[1] * a.shape[2])
        form = p.form or choose_form(p, a.shape[2], a.shape[3], a.shape[1], k, dout, "trace", pairs)
        if form == "ghost":
            return a.numel() + k * y.numel(), 0
        return a.numel(), a.shape[2] * a.shape[3] * dout


class EmbeddingRule(Rule):
    """``embedding``: a lookup ``y[s] = W[idx[s]]``; ghost (:class:`GhostEmbedding`: index comparisons) or
    materialized (``[b, k, V D]``, one scatter-add). The trace path gathers it in ghost form only."""

    default_form = "ghost"

    def tile_feature(self, p, c, g_calls, v, ctx):
        idx, g = embedding_factors(p, c.inputs, g_calls)  # idx [b, S], g [b, k, S, 1, D]
        V = p.module.num_embeddings
        if p.form is None:
            p.form = choose_form(p, 1, V, idx.shape[1], g.shape[1], g.shape[4], ctx.kernel, ctx.pairs_per_example)
        F = embedding_materialized(idx, g, V) if p.form == "materialized" else None
        mine = None
        if v is not None and F is not None:
            mine = [torch.einsum("bk,bkp->p", v, F).view(p.module.weight.shape)]
        elif v is not None:
            gv_calls = [torch.einsum("bk,bk...->b...", v, gk).unsqueeze(1) for gk in g_calls]
            mine = batch_grad_from_factors(p, idx, embedding_factors(p, c.inputs, gv_calls)[1][:, 0])
        return (GhostEmbedding(idx, g) if F is None else Materialized(F)), mine

    def trace_state(self, p, c, k, pairs, K):
        b = K.shape[0]
        idx = torch.cat([i.reshape(b, -1) for i in c.inputs], 1)
        return {"idx": idx, "inputs": c.inputs,
                "ghost": GhostEmbedding.gathering(idx, k, p.module.embedding_dim, K)}

    def trace_output(self, p, st, g_calls, gram, workspace, a_out, w):
        _, g = embedding_factors(p, st["inputs"], [gk.unsqueeze(1) for gk in g_calls])  # [b, 1, S, 1, D]
        g = g[:, 0, :, 0]  # [b, S, D]
        st["ghost"].set_output(a_out, g.unsqueeze(2))
        return g

    def trace_check(self, p, st, m, w):  # m: [b, S, D] as the helper's [b, S, 1, D]
        return batch_grad_from_factors(p, st["idx"], (m * w[:, None, None]).unsqueeze(2))

    def trace_elements(self, p, x, y, k, pairs):
        return k * y.numel(), 0


class NormRule(Rule):
    """``norm``: elementwise affine parameters on a normalized input (LayerNorm, GroupNorm, RMSNorm, BatchNorm
    in eval mode; a transposed convolution's bias): materialized ``[b, k, P]`` from the normalized inputs."""

    chooses_form = False

    def tile_feature(self, p, c, g_calls, v, ctx):
        F = norm_grads(p, c, g_calls)
        return Materialized(F), ([torch.einsum("bk,bkp->p", v, F)] if v is not None else None)

    def check_reference(self, theirs):
        return [torch.cat([t.reshape(-1) for t in theirs])]

    def trace_state(self, p, c, k, pairs, K):
        return {"xhat": normalized_inputs(p, c), "calls": c}  # once per block, not once per output

    def trace_output(self, p, st, g_calls, gram, workspace, a_out, w):
        F = norm_grads(p, st["calls"], [g.unsqueeze(1) for g in g_calls], st["xhat"])[:, 0]  # [b, P]
        gram(F)
        return w @ F if w is not None else None

    def trace_check(self, p, st, m, w):
        return [m]


_POSITION = PositionRule()
RULES: dict[LayerKind, Rule] = {LayerKind.LINEAR: _POSITION, LayerKind.CONV: _POSITION, LayerKind.CONVT: _POSITION,
                                LayerKind.EMBEDDING: EmbeddingRule(), LayerKind.NORM: NormRule()}


def rule_for(plan: LayerPlan) -> Rule:
    """The capture rule of a planned layer's kind."""
    return RULES[plan.kind]
