"""Guards against models whose examples are not independent: per-example outputs and gradients that mix the batch
(:func:`check_probe_inputs`; train-mode BatchNorm, batch statistics), remembered per model structure and block size
(:func:`check_block_mixing`), and modules that cannot be planned per example (:func:`check_per_example`).
"""
from __future__ import annotations


import torch
from torch import nn

from ..._outputs import tensor_output
from ..._precision import exact_fp32
from . import caches


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


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-7 if dtype == torch.float64 else 1e-3 if dtype == torch.float32 else 3e-2  # 16-bit: ~eps x 8


def outputs_agree(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether the outputs ``got`` equal ``ref`` (the same examples, computed in another batch) to the rounding of
    their precision, relative to the largest output: a GPU picks other convolution algorithms for other batch
    sizes, while mixing changes outputs by O(1) of their scale."""
    tol = _tolerance(ref.dtype)
    return got.shape == ref.shape and torch.allclose(got, ref, rtol=tol, atol=tol * (1e-3 + float(ref.abs().max())))


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
        tol = _tolerance(ref.dtype)
        if not outputs_agree(part.detach(), ref):
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


def check_block_mixing(owner: nn.Module, model: nn.Module, call, x: torch.Tensor, structure: tuple) -> None:
    """:func:`check_probe_inputs` on the whole block ``x`` ``[b, ...]`` of ``model`` (``call(x)``: its output),
    outputs and gradients, once per model structure and state (``structure``), train/eval flags, example shape and
    block size ``b`` (a model may mix examples only in large batches), remembered for ``owner`` (the user's model)
    in ``caches.MIXING_CHECKED``: whether a model mixes examples is a property of its code, not of the values.
    Non-finite inputs are checked on every block (non-finite outputs make the kernel non-finite: an error there)."""
    b = x.shape[0]
    key = (structure, tuple(m.training for m in model.modules()), tuple(x.shape[1:]), x.dtype, str(x.device))
    known = caches.MIXING_CHECKED.get(owner)
    if known is not None and known[0] == key and b in known[1]:
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError("the probe inputs contain NaN/inf: the tangent kernel is undefined")
        return
    params = [p for p in model.parameters() if p.requires_grad]
    check_probe_inputs(call, x, sample=None, params=params)
    sizes = known[1] if known is not None and known[0] == key and len(known[1]) < 64 else set()
    sizes.add(b)
    caches.MIXING_CHECKED[owner] = (key, sizes)
