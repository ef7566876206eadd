"""Plain-torch reference implementations: the spec every fast path is tested against.

They are written for clarity, not speed or memory: boolean masks of every example kept in memory,
``n x n`` Gram matrices materialized, traces taken literally, everything in float64.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ._loaders import as_reference_module, evaluating, iter_inputs, model_device
from ._modules import relu_modules, resolve_layer
# the NTK spec lives beside the engine it specifies (lazyhasty/ntk/naive.py); this module stays the one face
from .ntk.naive import _center, _trainable, jacobian_rows, kernel_alignment, ntk_alignment, ntk_cross, ntk_gram  # noqa: F401


# --- ops ------------------------------------------------------------------------------------------
def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """``[n, u]`` -> ``[n, ceil(u/32)]`` int32; bit b of word w is ``x[:, 32 w + b] > 0`` (numpy packbits)."""
    pos = (x.detach().cpu() > 0).numpy()
    n, u = pos.shape
    words = (u + 31) // 32
    padded = np.zeros((n, words * 32), dtype=bool)
    padded[:, :u] = pos
    packed = np.packbits(padded, axis=1, bitorder="little")  # [n, 4 * words] bytes, little-endian bits
    return torch.from_numpy(packed.view("<u4").view(np.int32).copy()).to(x.device)


def sign_mismatch(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``[n]`` int64: units whose sign ``x > 0`` differs from the bits (unpacked bit by bit)."""
    u = x.shape[1]
    b = np.unpackbits(bits.detach().cpu().numpy().view(np.uint8), axis=1, bitorder="little")[:, :u].astype(bool)
    pos = (x.detach().cpu() > 0).numpy()
    return torch.from_numpy((pos != b).sum(1).astype(np.int64)).to(x.device)


# --- metrics --------------------------------------------------------------------------------------
def _masks(model: nn.Module, names: list[str], loader, device, functional: bool = False) -> torch.Tensor:
    """[n, total units] boolean ReLU on/off masks of every example, all kept in memory."""
    import contextlib

    from ._modules import FunctionalReLUs

    mods = dict(model.named_modules())
    outs: list[torch.Tensor] = []

    def keep(site, o):
        outs.append(o.detach().reshape(o.shape[0], -1).clone())  # .clone(): a later in-place op must not change it

    hooks = [mods[n].register_forward_hook(lambda m, a, o: keep(None, o)) for n in names]
    rows = []
    try:
        with torch.no_grad(), evaluating(model):
            for x in iter_inputs(loader, device):
                outs.clear()
                with FunctionalReLUs(model, keep) if functional else contextlib.nullcontext():
                    model(x)
                if not outs:
                    raise ValueError("no ReLU ran during the forward pass")
                h = torch.cat(outs, 1)
                if torch.isnan(h).any():
                    raise ValueError("NaN in activations")
                rows.append((h > 0).cpu())
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(rows)


def sign_similarity(model: nn.Module, loader, reference, *, modules=None, reduction: str = "mean"):
    """Naive sign similarity: masks of both models for all examples, compared elementwise.

    The loader is iterated twice, so it must yield the same examples in the same order.
    """
    ref = as_reference_module(model, reference)
    names = [n for n, _ in relu_modules(model, modules)]
    functional = modules is None  # F.relu / torch.relu / clamp(min=0) calls count as ReLUs too
    m = _masks(model, names, loader, model_device(model), functional)
    m0 = _masks(ref, names, loader, model_device(ref), functional)
    same = (m == m0).double()
    return same.mean(1) if reduction == "none" else same.mean().item()


def _features(model: nn.Module, name: str, where: str, loader, device) -> torch.Tensor:
    module = dict(model.named_modules())[name]
    got: list[torch.Tensor] = []
    if where == "input":
        h = module.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    else:
        h = module.register_forward_hook(lambda m, a, o: got.append(o.detach()))
    rows = []
    try:
        with torch.no_grad(), evaluating(model):
            for x in iter_inputs(loader, device):
                got.clear()
                model(x)
                rows.append(got[0].reshape(x.shape[0], -1).double().cpu())
    finally:
        h.remove()
    return torch.cat(rows)


def representation_alignment(model: nn.Module, loader, reference, *, layer=None, where=None,
                             centered: bool = False) -> float:
    """Naive representation alignment: ``n x n`` Gram matrices of all features, then :func:`kernel_alignment`."""
    ref = as_reference_module(model, reference)
    name, _ = resolve_layer(model, layer)
    where = where or ("input" if layer is None else "output")
    phi = _features(model, name, where, loader, model_device(model))
    phi0 = _features(ref, name, where, loader, model_device(ref))
    return kernel_alignment(phi @ phi.T, phi0 @ phi0.T, centered=centered)
