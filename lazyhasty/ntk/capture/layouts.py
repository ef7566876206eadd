"""Layouts: per-example factors from captured tensors.

A planned layer's per-example gradient is ``g_i^T a_i`` summed over positions; these functions turn a captured
input ``x`` and output gradient ``g`` into the factors ``a [b, S, d_in]`` and ``g [b, S, k, d_out]`` (linear,
N-d conv patches, transposed-conv adjoint patches, embeddings by index), the normalized inputs of norm layers,
and the materialized ``[b, k, P]`` gradients from factors (:func:`to_materialized`).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .norm_calls import call_reduction, normalized_call_input
from .captured import Calls
from .plan import CONV_TRANSPOSE_TYPES, NORM_TYPES, LayerPlan


# --- whether captured tensors fit a layout ----------------------------------------------------------
_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2,
              nn.ConvTranspose3d: 3}


def layout_mismatch(plan: LayerPlan, calls: Calls, b: int) -> str | None:
    """Why the captured ``calls`` of a planned layer do not fit its kind's layout, or None when they do.

    The layouts below read a call's input ``x`` and output ``y`` as the base class's forward makes them: batch
    first (``b`` examples), then ``nn.Linear``: ``[b, ..., G d_in]`` -> ``[b, ..., G d_out]`` at the same
    positions; convolutions: ``[b, C_in, *spatial]`` -> ``[b, C_out, *spatial']``; ``nn.Embedding``: indices
    ``[b, ...]`` -> ``[b, ..., D]``; norms: ``y`` the shape of ``x``, with ``normalized_shape`` trailing
    (LayerNorm, RMSNorm) or the channels on dim 1 (BatchNorm, GroupNorm); a norm subclass with its own forward
    (``plan.at_call``) is read at its norm call, whose output is its input's shape. A subclass whose forward is not its
    base class's (timm's ``LayerNorm2d`` permuting NCHW inputs, a Linear applied to halves of its input) or a
    module called on a tensor without the batch (T5's relative-position bias on ``[L, L]`` buckets) does not fit:
    the layer goes to the fallback with this reason (``explain()``), and any other error of a layout is a bug
    that is raised, not hidden.
    """
    m = plan.module
    for x, y in zip(calls.inputs, calls.outputs):
        shapes = f"input {list(x.shape)}, output {list(y.shape)}"
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != b or y.shape[0] != b:
            return f"a call's first dimension is not the batch of {b} ({shapes})"
        if plan.kind == "linear":
            G = getattr(m, "groups", 1)
            din, dout = G * m.in_features, G * m.out_features
            if x.numel() % (b * din) or y.numel() % (b * dout) or x.numel() // din != y.numel() // dout:
                return (f"a call does not map [b, ..., {din}] to [b, ..., {dout}] at the same positions as "
                        f"nn.Linear does ({shapes})")
        elif plan.kind in ("conv", "convT"):
            nd = next((d for t, d in _CONV_DIMS.items() if isinstance(m, t)), None)
            if nd is not None and (x.dim() != nd + 2 or y.dim() != nd + 2 or x.shape[1] != m.in_channels
                                   or y.shape[1] != m.out_channels):
                return (f"a call is not [b, {m.in_channels}, {nd} spatial dims] -> [b, {m.out_channels}, ...] as "
                        f"{_base_name(m, tuple(_CONV_DIMS))} computes it ({shapes})")
        elif plan.kind == "embedding":
            if tuple(y.shape) != tuple(x.shape) + (m.embedding_dim,):
                return f"a call does not map indices [b, ...] to [b, ..., {m.embedding_dim}] ({shapes})"
        elif isinstance(m, NORM_TYPES):
            ns = tuple(getattr(m, "normalized_shape", ()) or ())
            if isinstance(m, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)):
                fits = tuple(x.shape[x.dim() - len(ns):]) == ns
                want = f"[b, ..., {', '.join(map(str, ns))}]"
            else:
                c = m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features
                fits = x.dim() >= 2 and x.shape[1] == c
                want = f"[b, {c}, ...]"
            if not fits or y.shape != x.shape:
                return f"a call is not {want} -> the same shape as {_base_name(m, NORM_TYPES)} computes it ({shapes})"
    return None


def _base_name(m: nn.Module, types: tuple) -> str:
    """The torch class among ``types`` that ``m`` is an instance of (its own class or the nearest base)."""
    return next(t.__name__ for t in type(m).__mro__ if t in types)


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


def linear_factors(plan: LayerPlan, inputs: list[torch.Tensor], grads: list[torch.Tensor]):
    """Natural layouts over all calls of the module (positions of the calls concatenated) from the calls'
    ``inputs`` and output gradients ``grads``: a ``[b, G, d_in', S]`` and g ``[b, k, G, d_out, S]``."""
    a_calls = [linear_a(plan, x) for x in inputs]
    g_calls = [linear_g(plan, gk, x.shape[2:]) for gk, x in zip(grads, inputs)]
    a = torch.cat(a_calls, -1) if len(a_calls) > 1 else a_calls[0]
    g = torch.cat(g_calls, -1) if len(g_calls) > 1 else g_calls[0]
    return a, g


def ghost_layout(a: torch.Tensor, g: torch.Tensor):
    """Natural layouts to the ghost form's ``a [b, S, G, d_in]``, ``g [b, k, S, G, d_out]`` (views)."""
    return a.permute(0, 3, 1, 2), g.permute(0, 1, 4, 2, 3)


def embedding_factors(plan: LayerPlan, inputs: list[torch.Tensor], grads):
    """(idx [b, S], g [b, k, S, 1, D]) over all calls, from their index ``inputs`` and output gradients."""
    m = plan.module
    idx_calls, g_calls = [], []
    for idx, gk in zip(inputs, grads):
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


def normalized_inputs(plan: LayerPlan, calls: Calls) -> list:
    """Per call of a norm layer (``calls``): its normalized input ``xhat`` (None for a transposed convolution's
    bias plan), which the weight's per-example gradient multiplies (computed once per block, for every output)."""
    m = plan.module
    if plan.at_call:  # the recorded norm calls without their affine parameters
        return [normalized_call_input(func, args, x) for x, (func, args) in zip(calls.inputs, calls.call_args)]
    out = []
    for x in calls.inputs:
        if isinstance(m, nn.LayerNorm):
            out.append(F.layer_norm(x, m.normalized_shape, eps=m.eps))
        elif isinstance(m, nn.GroupNorm):
            out.append(F.group_norm(x, m.num_groups, eps=m.eps))
        elif isinstance(m, CONV_TRANSPOSE_TYPES):
            out.append(None)
        elif hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
            out.append(F.rms_norm(x, m.normalized_shape, eps=m.eps))
        else:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out.append((x - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps))
    return out


def norm_grads(plan: LayerPlan, calls: Calls, grads, xhats: list | None = None) -> torch.Tensor:
    """Materialized per-example gradients [b, k, P] of a norm layer's affine parameters from its ``calls`` and
    their output gradients ``grads`` (``xhats``: its :func:`normalized_inputs`, when already at hand)."""
    m = plan.module
    total = None
    if xhats is None:
        xhats = normalized_inputs(plan, calls)
    for i, (xhat, gk) in enumerate(zip(xhats, grads)):
        b, k = gk.shape[:2]
        if plan.at_call:
            red = call_reduction(*calls.call_args[i], gk)
        elif isinstance(m, nn.LayerNorm):
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


def embedding_materialized(idx: torch.Tensor, g: torch.Tensor, V: int) -> torch.Tensor:
    """Per-example gradients ``[b, k, V D]`` of an embedding from its indices ``[b, S]`` and output gradients
    ``g`` ``[b, k, S, 1, D]`` (padding positions already zero): one scatter-add of every position's gradient into
    its row."""
    b, k, S, _, D = g.shape
    buf = g.new_zeros(b * V, k, D)
    rows = (idx + V * torch.arange(b, device=idx.device)[:, None]).reshape(-1)  # [b S] rows of the flat buffer
    buf.index_add_(0, rows, g[:, :, :, 0].permute(0, 2, 1, 3).reshape(b * S, k, D))
    return buf.view(b, V, k, D).permute(0, 2, 1, 3).reshape(b, k, V * D)


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
