"""Torch twins of the Triton NTK kernels (:mod:`lazyhasty.ntk.forms.triton_kernels`): the same signatures (less the
interpreter flag) and the same math, in plain torch, accumulated in float64. They are the spec each kernel is
tested against (``tests/ntk/test_forms_triton.py``, ``lazyhasty check``), and what the engine's torch path computes
with GEMMs (:mod:`lazyhasty.ntk.forms`).
"""
from __future__ import annotations

import torch


def gram(x: torch.Tensor, y: torch.Tensor, symmetric: bool = False, outputs: int = 1) -> torch.Tensor:
    """``x @ y.T`` ``[M, N]`` (x: ``[M, P]``, y: ``[N, P]``); ``outputs`` equal row segments, one dot product
    each, summed: the same number; ``symmetric`` (x is y) changes nothing but which tiles a kernel runs."""
    P = x.shape[1] // outputs
    out = torch.zeros(x.shape[0], y.shape[0], dtype=torch.float64, device=x.device)
    for a in range(outputs):
        out += x[:, a * P:(a + 1) * P].double() @ y[:, a * P:(a + 1) * P].double().T
    return out


def ghost_gram(a_i: torch.Tensor, a_j: torch.Tensor, g_i: torch.Tensor, g_j: torch.Tensor,
               symmetric: bool = False) -> torch.Tensor:
    """``[bI k, bJ k]`` ghost-form Gram of one linear layer: ``sum_{s,t} (a_i[s].a_j[t]) (g_ia[s].g_jb[t])``.

    a_*: ``[b, S, d_in]``; g_*: ``[b, k, S, d_out]``."""
    A = torch.einsum("isd,jtd->isjt", a_i.double(), a_j.double())
    G = torch.einsum("iasd,jbtd->iasjbt", g_i.double(), g_j.double())
    bi, k = g_i.shape[:2]
    return torch.einsum("isjt,iasjbt->iajb", A, G).reshape(bi * k, g_j.shape[0] * k)


def alignment_partials(ft_i: torch.Tensor, ft_j: torch.Tensor, f0_i: torch.Tensor, f0_j: torch.Tensor,
                       symmetric: bool = False, outputs: int = 1) -> torch.Tensor:
    """``[3]`` float64: ``sum Kt*K0``, ``sum Kt^2``, ``sum K0^2`` over the tile, ``Kt = F_I F_J^T`` (per-output
    segments summed, as :func:`gram`) for the model and ``K0`` for the reference."""
    Kt, K0 = gram(ft_i, ft_j, symmetric, outputs), gram(f0_i, f0_j, symmetric, outputs)
    return torch.stack([(Kt * K0).sum(), (Kt * Kt).sum(), (K0 * K0).sum()])
