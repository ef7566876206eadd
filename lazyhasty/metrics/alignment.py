"""Kernel alignment of explicit Gram matrices, and the streamed representation alignment.

``KA(K1, K2) = Tr[K1 K2] / (|K1|_F |K2|_F)`` (Cristianini et al. 2001; the paper's eq. 5). For Gram
matrices of features ``K = Phi Phi^T`` (``Phi``: ``[n, d]``), ``Tr[K_t K_0] = |Phi_t^T Phi_0|_F^2`` and
``|K|_F = |Phi^T Phi|_F``, so the alignment over all n examples needs only ``d x d`` accumulators,
summed batch by batch: exact for any batching, memory ``O(d^2)`` whatever n is.
"""
from __future__ import annotations

import torch
from torch import nn

from .._precision import exact_fp32
from .._modes import measuring
from .._probing import probing
from .._loaders import (as_reference_module, check_materialized, iter_inputs, model_and_reference, model_device,
                        model_inputs, run_model)
from .._exact import AlignmentSums, CentredMoments
from ._sites import CallRecorder, resolve_layer, same_modules

# d x d float64 accumulators above this size are refused with a hint (a conv feature map is rarely meant).
MAX_ACCUMULATOR_BYTES = 4 * 2**30


def _check_gram(K: torch.Tensor, name: str) -> None:
    if not isinstance(K, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(K).__name__}")
    if not K.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {K.dtype}")
    ok = (K.dim() == 2 and K.shape[0] == K.shape[1]) or (
        K.dim() == 4 and K.shape[0] == K.shape[2] and K.shape[1] == K.shape[3])
    if not ok:
        raise ValueError(f"{name} must be [n, n] or [n, k, n, k], got shape {tuple(K.shape)}")
    if K.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(K).all()):
        raise ValueError(f"NaN/inf in {name}: alignment is undefined")
    m = K.reshape(K.shape[0] * (K.shape[1] if K.dim() == 4 else 1), -1).detach()
    asym = float((m - m.T).abs().max())
    if asym > 64 * torch.finfo(K.dtype).eps * max(float(m.abs().max()), 1e-300):
        raise ValueError(f"{name} is not symmetric (max |K - K^T| = {asym:.3g}): a Gram matrix is expected")


def kernel_alignment(K1: torch.Tensor, K2: torch.Tensor, *, centered: bool = False) -> float:
    """Kernel alignment `Tr[K1 K2] / (|K1|_F |K2|_F)` of two symmetric Gram matrices, exactly.

    `centered=True` uses `H K H` with `H = I - 11^T / n` over examples (CKA). The sums are error-free in
    float64 (`lazyhasty._exact`), so the result is within ~1e-15 of the exact value of the given entries even
    when the centred kernels are 1e-4 of the uncentred ones.

    Args:
        K1: `[n, n]` or `[n, k, n, k]` (flattened to `[nk, nk]`) Gram matrix.
        K2: the other Gram matrix, the same shape as `K1`.
        centered: centre both kernels over examples first (centred kernel alignment, CKA).

    Returns:
        The alignment, in `[-1, 1]`.

    Raises:
        ValueError: the kernels are not square and symmetric, differ in shape, hold NaN/inf, or a centred
            kernel is zero to the inputs' working precision (duplicated rows, one example).

    Example:
        >>> f = torch.randn(5, 3, dtype=torch.float64)
        >>> round(kernel_alignment(f @ f.T, 2 * f @ f.T), 12)   # invariant to scale
        1.0
    """
    _check_gram(K1, "K1")
    _check_gram(K2, "K2")
    if K1.shape != K2.shape:
        raise ValueError(f"K1 and K2 must have the same shape, got {tuple(K1.shape)} and {tuple(K2.shape)}")
    K1 = K1.detach()
    K2 = K2.detach().to(K1.device)
    n = K1.shape[0]
    full = K1.dim() == 4
    sums = AlignmentSums(n, K1.shape[1] if full else 1, "full" if full else "trace", centered, K1.device)
    sums.add(K1, K2, slice(0, n), slice(0, n), False)
    sums.lower = -1.0  # arbitrary symmetric matrices: [-1, 1] (NTKs, PSD: [0, 1])
    return sums.alignment("the kernels")


def _accumulator_guard(da: int, db: int) -> None:
    nbytes = 8 * (da ** 2 + db ** 2 + da * db)
    if nbytes > MAX_ACCUMULATOR_BYTES:
        raise ValueError(
            f"representation of {da} features needs {nbytes / 2**30:.1f} GiB of d x d accumulators: "
            "choose a pooled / lower-dimensional layer with layer="
        )


def _feature_moments(centered: bool, dtype: torch.dtype | None = None) -> CentredMoments:
    return CentredMoments(centered, dtype, _accumulator_guard)


@torch.no_grad()
@probing("model", reference="reference")  # named inputs (lazyhasty._outputs)
def representation_alignment(model: nn.Module, loader, reference=None, *, layer: nn.Module | str | None = None,
                             where: str | None = None, centered: bool = False,
                             dtype: torch.dtype | None = None, gram: str = "examples",
                             process_group=None) -> float:
    """Kernel alignment of the representation Gram matrices of `model` and `reference` over all examples.

    `phi(x)` (flattened to `[d]`) is, by default, the input of the last `nn.Linear` in `model.modules()`
    order (the paper's "last non-softmax layer"). With `K[i, j] = phi(x_i) . phi(x_j)` it returns
    `Tr[K_t K_0] / (|K_t|_F |K_0|_F)`, computed from `d x d` accumulators: exact for any batching, memory
    independent of n. `gram="examples"` aligns the `n x n` example Grams (the paper's text); `"features"` the
    `d x d` feature Grams `Phi^T Phi` (what the authors' code computed): the two agree at init and differ once
    the features rotate (the feature Gram ignores which example carries which feature). Both models run in eval
    mode.

    Args:
        model: the network now.
        loader: the probe examples: a tensor `[n, ...]`, or an iterable of batches.
        reference: the network at init (a module or its state dict); `None` for an
            [AlphaScaled][lazyhasty.regimes.AlphaScaled] / [Linearized][lazyhasty.regimes.Linearized] model,
            whose init it is.
        layer: a module of `model` or its qualified name: its output is `phi` (default: the input of the
            last `nn.Linear`).
        where: `"input"` or `"output"` of `layer` (default: `"output"` when `layer` is given, the input of
            the last `nn.Linear` otherwise).
        centered: centre the features over the whole probe set (linear CKA). Each batch is centred on its own
            mean and the co-moments merged (no large sum minus a large correction), so it stays exact when the
            features vary by 1e-4 of their size; identical representations (one example) are an error.
        dtype: per-batch GEMM precision (default fp32, fp64 for fp64 features); cross-batch sums are float64.
        gram: `"examples"` (default) or `"features"`, as above.
        process_group: a `torch.distributed` group (or `"world"`): each rank passes its own shard (possibly
            empty) and gets the alignment over the union, the same on every rank (the `d x d` moments are
            merged in rank order; centred ones with Chan's update). See `lazyhasty._dist`.

    Returns:
        The alignment, 1.0 at init.

    Raises:
        ValueError: `gram` is neither value, `layer` did not run or runs several times per forward, or the
            `d x d` accumulators would exceed 4 GiB (choose a pooled layer).

    Example:
        >>> import copy
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(32, 4)
        >>> init = copy.deepcopy(net).state_dict()
        >>> round(representation_alignment(net, x, init), 6)   # 1.0 at init
        1.0
    """
    if gram not in ("examples", "features"):
        raise ValueError(f"gram must be 'examples' or 'features', got {gram!r}")
    from .. import _dist

    group = _dist.resolve(process_group)
    model, reference = model_and_reference(model, reference)  # None: an AlphaScaled/Linearized's init
    ref = as_reference_module(model, reference)
    check_materialized(model, "model")
    check_materialized(ref, "reference")
    name, module = resolve_layer(model, layer)
    if group is not None:
        _dist.agree(group, "representation_alignment", model=_dist.structure(model), reference=_dist.structure(ref),
                    layer=name, where=where, centered=centered, dtype=str(dtype), gram=gram)
        _dist.check_same_parameters(group, "representation_alignment", model, ref)
    if where is None:
        where = "input" if layer is None else "output"
    (_, ref_module), = same_modules(ref, [name])
    got: dict[str, torch.Tensor] = {}

    def keep(key):
        def fn(site, t):
            if site != name:
                raise ValueError(f"layer {name!r} is called several times per forward: choose a layer called once")
            got[key] = t.detach()
        return fn

    device, ref_device = model_device(model), model_device(ref)
    grams = _feature_moments(centered, dtype)
    rec_m = CallRecorder([(name, module)], keep("model"), where)
    rec_r = CallRecorder([(name, ref_module)], keep("ref"), where) if ref_module is not module else None
    failed = None
    try:
        with measuring(model, ref), exact_fp32():
            for x in iter_inputs(loader, device, allow_empty=group is not None, same_shape=True):
                got.clear()
                rec_m.new_forward()
                if rec_r is None:  # model is its own reference
                    run_model(model, model_inputs(x, model))
                    got["ref"] = got["model"]
                else:
                    rec_r.new_forward()
                    run_model(ref, model_inputs(x, ref, ref_device), "the reference")
                    run_model(model, model_inputs(x, model))
                if "model" not in got or "ref" not in got:
                    raise ValueError(f"layer {name!r} did not run during the forward pass")
                phi = got["model"].reshape(x.shape[0], -1)
                phi0 = got["ref"].to(device).reshape(x.shape[0], -1)
                if phi.dtype != phi0.dtype:  # a float64 reference of a float32 model: both in the wider dtype
                    wide = torch.promote_types(phi.dtype, phi0.dtype)
                    phi, phi0 = phi.to(wide), phi0.to(wide)
                grams.add(phi, phi0)
    except Exception as exc:  # noqa: BLE001 - with a group, every rank learns of it (below)
        if group is None:
            raise
        failed = exc
    finally:
        rec_m.remove()
        if rec_r is not None:
            rec_r.remove()
    if group is not None:
        _dist.settle(group, failed, "representation_alignment")
        grams.merge_states(_dist.gather_objects(grams.state(), group), device)
    return grams.alignment(gram=gram)


def target_alignment(K: torch.Tensor, y: torch.Tensor, *, centered: bool = False, groups=None):
    """Kernel-target alignment `KA(K, Y Y^T)` (Cristianini et al. 2001; Baratin et al. 2021).

    Exact sums as [kernel_alignment][lazyhasty.metrics.kernel_alignment].

    Args:
        K: `[n, n]` or `[n, k, n, k]` kernel.
        y: `[n]` class indices (one-hot `Y` `[n, C]`; for a full kernel C must be k), `[n, k]` targets, or
            `[n]` real targets.
        centered: centre the kernel and the targets' kernel over examples (CKA).
        groups: an `[n]` boolean mask or integer group labels.

    Returns:
        The alignment; with `groups`, `{group: KA of the group's sub-kernel with its targets}` (a mask gives
        `{True: ..., False: ...}`).

    Raises:
        ValueError: `y` or `groups` has not n rows, class labels out of range, or a full kernel with targets
            of another width.

    Example:
        >>> K = ntk_gram(model, x, kernel="trace")   # [n, n]
        >>> target_alignment(K, labels)              # how much the NTK "sees" the labels
    """
    _check_gram(K, "K")
    n = K.shape[0]
    y = torch.as_tensor(y).to(K.device)
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} rows, the kernel {n}")
    if y.dim() == 1 and not y.is_floating_point():
        C = K.shape[1] if K.dim() == 4 else int(y.max()) + 1
        if int(y.min()) < 0 or int(y.max()) >= C:
            raise ValueError(f"class labels must lie in 0..{C - 1}")
        Y = torch.nn.functional.one_hot(y.long(), C).to(torch.float64)
    else:
        Y = y.to(torch.float64).reshape(n, -1)
    if K.dim() == 4 and Y.shape[1] != K.shape[1]:
        raise ValueError(f"a full kernel with k = {K.shape[1]} outputs needs targets [n, {K.shape[1]}]")
    if groups is not None:
        g = torch.as_tensor(groups).to(K.device)
        if g.shape != (n,):
            raise ValueError(f"groups must be an [n] = [{n}] mask or label vector, got shape {tuple(g.shape)}")
        out = {}
        for v in torch.unique(g).tolist():
            idx = (g == v).nonzero().flatten()
            sub = K[idx][:, idx] if K.dim() == 2 else K[idx][:, :, idx]
            out[v] = target_alignment(sub, Y[idx], centered=centered)
        return out
    T = Y @ Y.T if K.dim() == 2 else torch.einsum("ia,jb->iajb", Y, Y)
    return kernel_alignment(K, T.to(K.dtype) if K.dtype == torch.float64 else T, centered=centered)
