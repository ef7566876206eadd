"""The NTK spec: naive autograd, one ``torch.autograd.grad`` call per example and output, every kernel
materialized in float64. What every path of the engine is tested against (``tests/test_ntk.py`` on the zoos);
``lazyhasty.reference`` re-exports it beside the other specs.

    J[i, a, p] = d f_a(x_i) / d theta_p,     K[i, a, j, b] = sum_p J[i, a, p] J[j, b, p]
    KA(K1, K2) = Tr[K1 K2] / (|K1|_F |K2|_F)

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lazyhasty.ntk.naive import ntk_gram
    >>> ntk_gram(nn.Linear(3, 2), torch.randn(4, 3), kernel="trace").shape
    torch.Size([4, 4])
"""
from __future__ import annotations

import torch
from torch import nn

from .._loaders import as_reference_module, iter_inputs, model_device


def _center(K: torch.Tensor) -> torch.Tensor:
    n = K.shape[0]
    H = torch.eye(n, dtype=K.dtype, device=K.device) - 1.0 / n
    if K.dim() == 2:
        return H @ K @ H
    return torch.einsum("ip,pajb,jq->iaqb", H, K, H)


def kernel_alignment(K1: torch.Tensor, K2: torch.Tensor, *, centered: bool = False) -> float:
    """``Tr[K1 K2] / (|K1|_F |K2|_F)`` with the trace taken literally, in float64."""
    K1, K2 = K1.double(), K2.double()
    if centered:
        K1, K2 = _center(K1), _center(K2)
    if K1.dim() == 4:
        n, k = K1.shape[:2]
        K1, K2 = K1.reshape(n * k, n * k), K2.reshape(n * k, n * k)
    return (torch.trace(K1 @ K2) / (torch.linalg.matrix_norm(K1) * torch.linalg.matrix_norm(K2))).item()


# --- empirical NTK --------------------------------------------------------------------------------
def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def jacobian_rows(model: nn.Module, loader, params: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``[n, k, p]``: d f_a(x_i) / d theta, one ``torch.autograd.grad`` call per example and output.

    ``params``: the parameters theta (default: all trainable ones), in this order.
    """
    params = _trainable(model) if params is None else list(params)
    device = model_device(model)
    rows = []
    for x in iter_inputs(loader, device):
        for i in range(x.shape[0]):
            out = model(x[i:i + 1]).reshape(-1)
            per_out = []
            for a in range(out.shape[0]):
                g = torch.autograd.grad(out[a], params, retain_graph=a + 1 < out.shape[0], allow_unused=True)
                per_out.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                          for gi, p in zip(g, params)]))
            rows.append(torch.stack(per_out))
    return torch.stack(rows)


def ntk_gram(model: nn.Module, loader, *, kernel: str = "full") -> torch.Tensor:
    """Naive empirical NTK: per-example, per-output autograd Jacobian rows, then ``J J^T`` in float64.

    ``kernel="full"``: ``[n, k, n, k]``; ``"trace"``: ``[n, n]`` (sum over a = b); ``"diagonal"``: ``[n, k, k]``.
    """
    J = jacobian_rows(model, loader).double()  # [n, k, p]
    if kernel == "full":
        return torch.einsum("iap,jbp->iajb", J, J)
    if kernel == "trace":
        return torch.einsum("iap,jap->ij", J, J)
    if kernel == "diagonal":
        return torch.einsum("iap,ibp->iab", J, J)
    raise ValueError(f"kernel must be 'full', 'trace' or 'diagonal', got {kernel!r}")


def ntk_cross(model: nn.Module, loader1, loader2, *, kernel: str = "full") -> torch.Tensor:
    """Naive cross kernel ``K(X1, X2)``: ``[n1, k, n2, k]`` (full) or ``[n1, n2]`` (trace), in float64."""
    J1, J2 = jacobian_rows(model, loader1).double(), jacobian_rows(model, loader2).double()
    if kernel == "full":
        return torch.einsum("iap,jbp->iajb", J1, J2)
    if kernel == "trace":
        return torch.einsum("iap,jap->ij", J1, J2)
    raise ValueError(f"kernel must be 'full' or 'trace' for a cross kernel, got {kernel!r}")


def ntk_alignment(model: nn.Module, loader, reference, *, kernel: str = "full", centered: bool = False) -> float:
    """Naive NTK alignment: both kernels materialized, then :func:`kernel_alignment`."""
    ref = as_reference_module(model, reference)
    K = ntk_gram(model, loader, kernel=kernel)
    K0 = ntk_gram(ref, loader, kernel=kernel)
    if kernel == "diagonal":
        K, K0 = torch.block_diag(*K), torch.block_diag(*K0)
    return kernel_alignment(K, K0, centered=centered)
