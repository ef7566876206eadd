"""The layer check shared by the tile and one-block trace paths: random example and output weights
(:func:`check_weights`, seeded by :data:`CHECK_SEED`), autograd's gradient of the same weighted sum per layer
(:func:`weighted_layer_grads`) and the comparison (:func:`grads_close`); the perturbed twin it runs on
(:func:`perturbed_twin`), what its rounds found (:class:`CheckRounds`); :class:`PlanChanged`, raised when its
outcome changed the plan a block ran on.
"""
from __future__ import annotations

import copy

import torch
from torch import nn



def grads_close(mine: torch.Tensor, theirs: torch.Tensor, floor: float = 0.0) -> bool:
    """Whether a layer check's gradient ``mine`` equals autograd's ``theirs``: the same shape, and a max error
    within 1e-3 (16/32-bit) or 1e-7 (float64) of ``max(|mine|, |theirs|, floor)``.

    No factor for the tensor's size: a max error does not grow with the number of entries (each is its own
    reduction). Before, the tolerance was multiplied by ``sqrt(rows)``, and a flattened norm gradient's rows are
    its entries: 5% of the largest on a 1280-channel norm, 13% on timm ViT's position embedding. Measured on
    every layer check of ``benchmarks/outside_models.py`` in float32 (both kernels): the largest error of a
    right layer is 0.008 of this tolerance (timm mobilenetv3; 0.001-0.002 on the transformers); in float64, 0.4
    (HF T5, whose norms compute their variance in float32: errors up to 3.8e-8 of the scale), ~1e-7 elsewhere.
    A wrong layer is off by percents (a norm's activation ignored: 144%; a second use of its weight: 1%).

    ``floor`` (:func:`check_floor`): the scale of the rounding a gradient zero in exact arithmetic carries (an
    attention key's bias under softmax: noise of its layer's weight gradient, not of its own). Relative, not to
    ``1 + max |theirs|`` as before: that tolerance was absolute below 1, and a float32 layer whose captured
    gradient was half autograd's passed on a model with outputs of order 1e-5 (a 40% error in the kernel,
    tests/ntk/test_capture_check.py).
    """
    if mine.shape != theirs.shape:
        return False
    if not theirs.numel():
        return True
    scale = max(float(theirs.abs().max()), float(mine.abs().max()), floor)
    tol = (1e-3 if theirs.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-7) * scale
    return float((mine - theirs).abs().max()) <= tol


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


# A layer's floor is at least this share of the check's largest gradient: a gradient zero in exact arithmetic
# carries float32 rounding of the terms summed into it (~1e-7 of them); a layer this much smaller than the rest
# adds at most ~1e-6 of the kernel whatever its error. Not the largest gradient itself: gradients of timm's
# efficientnet span orders of magnitude, and with that floor a BatchNormAct2d planned as a plain norm (its
# activation ignored) passed and the float32 kernel was 144% off (tests/ntk/test_capture_check.py).
CHECK_FLOOR_SHARE = 1e-3


def check_scale(grads) -> float:
    """The largest magnitude among reference gradients (0.0 for none)."""
    return max((float(t.abs().max()) for t in grads if t.numel()), default=0.0)


def check_floor(layer_grads, largest: float) -> float:
    """``floor`` of :func:`grads_close` for one layer (or tensor): its own largest reference gradient, and at
    least :data:`CHECK_FLOOR_SHARE` of the check's largest (``largest``)."""
    return max(check_scale(layer_grads), CHECK_FLOOR_SHARE * largest)


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


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (what a deep copy of it takes)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def perturbed_twin(model: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``model`` with every parameter perturbed by noise of its own scale (so no gradient is zero
    by the values' accident: a zero-initialised head, torchvision's ViT). Which layers capture exactly is a property
    of the model's code, not of its values, so the check's outcome holds for the model.

    A nonzero parameter of more than one element keeps its root mean square: noise of mean square ``s^2`` raises a
    tensor's by ``s^2``, a gain that compounds over depth where nothing renormalises (eval-mode BatchNorm at
    init): timm's mobilenetv3 twin had outputs 2.5e5 times the model's, every squeeze-excite gate of a block
    saturated and its layers' gradients zero, which left the check undecided (run again on the model's own
    block). Zero tensors (and scalars) get the noise as it is."""
    twin = copy.deepcopy(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for t in twin.parameters():
            # drawn on the CPU (the same twin on any device) in the parameter's precision: float64 draws
            # were a quarter of a first call on the paper's ResNet18 (11M parameters)
            dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
            noise = torch.randn(t.shape, generator=gen, dtype=dtype).to(t.device, t.dtype)
            rms = float(torch.linalg.vector_norm(t)) / t.numel() ** 0.5 if t.numel() > 1 else 0.0
            t.add_(noise * (0.5 * float(t.abs().mean()) + 0.1))
            if rms > 0:
                t.mul_(rms * t.numel() ** 0.5 / float(torch.linalg.vector_norm(t)))
    return twin


class CheckRounds:
    """What the layer check's rounds on one Featurizer found so far.

    Attributes:
        passed: ``(plan name, weight map)`` of the layers a round found right (their gradients not all zero).
        dims: ``{plan name: (G, d_in, S, k, d_out)}``: each layer's cost-model dims, with the call's ``k`` (a
            twin's rounds see ``k = 1``).
        scale: the largest reference gradient of the current round (:func:`check_floor`).
    """

    def __init__(self):
        self.passed: set = set()
        self.dims: dict = {}
        self.scale = 0.0

    def note(self, plans: list, per_plan: list, bad: list, k: int) -> None:
        """After a round: record the layers it decided right and every layer's dims (``per_plan``: autograd's
        gradients per plan; ``bad``: the plans that failed)."""
        for p, theirs in zip(plans, per_plan):
            if p.costs and "dims" in p.costs:
                G, din, S, _, dout = p.costs["dims"]
                self.dims[p.name] = (G, din, S, k, dout)
            if p not in bad and all(bool(t.any()) for t in theirs):
                self.passed.add((p.name, p.weight_map))

    def all_passed(self, plans: list) -> bool:
        """Whether every layer of ``plans`` passed an earlier round (then no round more is needed: a layer's
        outcome depends on its own code, not on which other layers are planned)."""
        return bool(plans) and all((p.name, p.weight_map) in self.passed for p in plans)
