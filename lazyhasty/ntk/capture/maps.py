"""Maps from captured per-example quantities to parameters: affine maps of layers whose weight enters through one
``F.linear`` (:func:`affine_map`, :func:`through_affine`), parametrized weights (:func:`map_parametrized_rows`),
and the split of a layer's flat per-example gradient into its parameters (:func:`split_params`,
:func:`batch_grad_from_factors`).
"""
from __future__ import annotations


import torch
from torch import nn

from .backward import batched_vjp, parametrized_flat, split_rows, through_parametrization
from .layouts import convT_dims
from .plan import LayerPlan, direct_linear
from .sites import MatmulSite


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
    got = batched_vjp(tuple(outs), own, tuple(grads))
    return got if flat else split_rows(got, own)


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
    out = parametrized_flat(m, rows[..., :din], do if plan.use_bias else 0)
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
