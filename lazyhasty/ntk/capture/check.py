"""The layer check shared by the tile and one-block trace paths: random example and output weights
(:func:`check_weights`, seeded by :data:`CHECK_SEED`), autograd's gradient of the same weighted sum per layer
(:func:`weighted_layer_grads`) and the comparison (:func:`grads_close`); :class:`PlanChanged`, raised when its
outcome changed the plan a block ran on.
"""
from __future__ import annotations


import torch



def grads_close(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether a layer check's gradient ``mine`` equals autograd's ``theirs`` (same shape; max error within
    1e-3 (16/32-bit) or 1e-8 (float64) of ``1 + max |theirs|``, times ``sqrt(rows)``)."""
    scale = float(theirs.abs().max()) if theirs.numel() else 0.0
    tol = (1e-3 if theirs.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8) * (1.0 + scale)
    return mine.shape == theirs.shape and float((mine - theirs).abs().max()) <= tol * max(1.0, mine.shape[0] ** 0.5)


# The layer check's random weights: the same draws on the tile path and the one-block trace path.
CHECK_SEED = 1234
# Examples of a block the check on a perturbed twin runs on: random example weights tell examples apart with
# any number above one, and a first call pays the twin's forward and backward on them (8 before). Not 3: the
# per-example-copy decisions then cannot tell the batch from RGB channels, and timm's mobilenetv3 tried its 43
# BatchNorm parameters one forward each.
CHECK_EXAMPLES = 4


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


class PlanChanged(Exception):
    """Raised by a block's computation when the layer check changed the plan it ran on (layers moved to the
    fallback or planned as affine maps, or ``auto`` took the whole-model Jacobian): the block is computed again,
    with the new plan, by ``Featurizer._settled`` (the one place that loops)."""
