"""What lazyhasty accepts as a "loader", and how models are run over one.

A loader is any iterable of batches. A batch is a tensor (the inputs), a tuple/list whose first
element is the input tensor (the rest, e.g. labels or ``None``, is ignored) or a dict with key ``"x"``.
A bare tensor passed as the loader itself is the whole probe set, cut into batches of
``DEFAULT_BATCH_SIZE`` examples along dim 0.

A batch of named inputs (a mapping of tensors without ``"x"``, e.g. ``{"input_ids", "attention_mask",
"labels"}``) is passed to the model as keyword arguments: the entry points turn it into one packed tensor and
the model into a function of it before these helpers see either (:mod:`lazyhasty._outputs`, which also says
which keys are inputs: every key but ``labels`` / ``label`` / ``label_ids``).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from ._modes import measuring

DEFAULT_BATCH_SIZE = 1024


def batch_inputs(batch) -> torch.Tensor:
    """The input tensor ``x`` of one batch (see the module docstring for the accepted forms)."""
    if isinstance(batch, torch.Tensor):
        x = batch
    elif isinstance(batch, Mapping):
        if "x" not in batch:
            raise ValueError(f"a dict batch must have the key 'x' (the inputs) here; got keys {sorted(map(str, batch))} "
                             "(dicts of named inputs are taken by the entry points: ntk_gram, ntk_alignment, the "
                             "metrics and probes)")
        x = batch["x"]
    elif isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("a tuple/list batch must have the inputs as its first element; got an empty one")
        x = batch[0]
    else:
        raise TypeError(
            f"cannot read inputs from a batch of type {type(batch).__name__}: expected a tensor, a tuple/list "
            "whose first element is the input tensor, or a dict with key 'x'"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"the inputs of a batch must be a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("the inputs of a batch must have a batch dimension (dim 0); got a 0-d tensor")
    return x


def iter_inputs(loader, device: torch.device | str | None = None, allow_empty: bool = False,
                same_shape: bool = False) -> Iterator[torch.Tensor]:
    """Yield the input tensor of every non-empty batch of ``loader``, moved to ``device``.

    Raises ``ValueError`` when the loader yields no example at all (unless ``allow_empty``: a rank's empty
    shard of a probe set sharded over processes), inputs on the meta device (no values), or, with
    ``same_shape``, a batch whose examples have another shape or dtype than the first batch's.
    """
    if isinstance(loader, torch.Tensor):
        if loader.dim() == 0:
            raise ValueError("a tensor loader must have a batch dimension (dim 0)")
        loader = loader.split(DEFAULT_BATCH_SIZE)
    elif not isinstance(loader, Iterable):
        raise TypeError(f"a loader must be an iterable of batches, got {type(loader).__name__}")
    seen, first = 0, None
    for i, batch in enumerate(loader):
        x = batch_inputs(batch)
        if x.device.type == "meta":
            raise ValueError("the loader's inputs are on the meta device: they hold no values (materialize them, "
                             "e.g. torch.randn(..., device='cpu'), before measuring)")
        if x.shape[0] == 0:
            continue
        if same_shape:
            if first is None:
                first = (tuple(x.shape[1:]), x.dtype)
            elif (tuple(x.shape[1:]), x.dtype) != first:
                raise ValueError(f"batch {i} of the loader has examples of shape {tuple(x.shape[1:])} ({x.dtype}) but "
                                 f"the first batch {first[0]} ({first[1]}): every batch must hold examples of one "
                                 "shape and dtype (pad or crop them alike)")
        seen += x.shape[0]
        yield x.to(device, non_blocking=True) if device is not None else x
    if seen == 0 and not allow_empty:
        raise ValueError("the loader is empty: it yielded no examples")


def all_inputs(loader, device: torch.device | str | None = None) -> torch.Tensor:
    """Every input of ``loader`` as one ``[n, ...]`` tensor (an empty loader is an error, as in iter_inputs)."""
    xs = list(iter_inputs(loader, device, same_shape=True))  # torch.cat would promote mixed dtypes silently
    return torch.cat(xs) if len(xs) > 1 else xs[0]


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter or buffer (None for a module with neither)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in model.buffers():
        if t.is_floating_point():
            return t.dtype
    return None


def check_materialized(model: nn.Module, name: str) -> None:
    """Raise ``ValueError`` when ``model`` (the argument ``name``) has parameters or buffers on the meta device."""
    for mname, module in model.named_modules():  # one traversal (named_parameters and named_buffers: one each)
        for key, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None and t.device.type == "meta":
                n = f"{mname}.{key}" if mname else key
                raise ValueError(f"{name} has tensors on the meta device ({n!r}): they hold no values; materialize "
                                 "the module (to_empty(device=...) and load_state_dict) before measuring it")


def model_inputs(x: torch.Tensor, model: nn.Module, device=None) -> torch.Tensor:
    """``x`` for ``model``: on its device, floating-point inputs in its floating dtype (what ntk_alignment does,
    so a float64 reference of a float32 model works); integer inputs (token ids) as they are."""
    dtype = model_dtype(model)
    if x.is_floating_point() and dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x.to(device) if device is not None else x


def run_model(model: nn.Module, x: torch.Tensor, name: str = "the model"):
    """``model(x)``, with torch's dtype error for integer inputs to a floating-point model made clear."""
    try:
        return model(x)
    except RuntimeError as exc:
        msg = str(exc)
        if not x.is_floating_point() and ("dtype" in msg or "scalar type" in msg or "Long" in msg or "Int" in msg):
            raise ValueError(f"the loader's inputs are {x.dtype} but {name} computes in {model_dtype(model)} ({msg.splitlines()[0]}):"
                             " pass floating-point inputs (x.float()); integer inputs are for models that embed "
                             "them (nn.Embedding)") from exc
        raise


def model_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def evaluating(*models: nn.Module):
    """Run models in eval mode (dropout off, BatchNorm on running stats) and restore their modes, buffers and
    RNG states after: :func:`lazyhasty._modes.measuring`."""
    return measuring(*models)


def check_same_architecture(model: nn.Module, reference: nn.Module) -> None:
    """Raise ``ValueError`` naming the first difference between two modules' parameter/buffer layouts."""
    a, b = model.state_dict(), reference.state_dict()
    missing = [k for k in a if k not in b]
    extra = [k for k in b if k not in a]
    if missing or extra:
        raise ValueError(
            "reference is not the same architecture as model: "
            f"entries only in model: {missing[:5]}, only in reference: {extra[:5]}"
        )
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(
                f"reference is not the same architecture as model: {k!r} has shape "
                f"{tuple(b[k].shape)} in reference and {tuple(a[k].shape)} in model"
            )


def as_reference_module(model: nn.Module, reference) -> nn.Module:
    """``reference`` as a module: a module of the same architecture, or a state_dict loaded into a copy."""
    import copy

    if isinstance(reference, nn.Module):
        check_same_architecture(model, reference)
        return reference
    if isinstance(reference, Mapping):
        ref = copy.deepcopy(model)
        own = ref.state_dict()
        bad_shapes = [
            k for k, v in reference.items()
            if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
        ]
        missing = [k for k in own if k not in reference]
        extra = [k for k in reference if k not in own]
        if missing or extra or bad_shapes:
            raise ValueError(
                "reference state_dict does not match the model's architecture: "
                f"missing {missing[:5]}, unexpected {extra[:5]}, shape mismatch {bad_shapes[:5]}"
            )
        ref.load_state_dict(reference)
        return ref
    raise TypeError(f"reference must be an nn.Module or a state_dict, got {type(reference).__name__}")


def model_and_reference(model: nn.Module, reference) -> tuple[nn.Module, object]:
    """The module to measure and its reference; ``reference=None`` takes the initialization a wrapper carries.

    ``AlphaScaled`` -> (its inner model, its frozen ``f_0``); ``Linearized`` -> (its model, the model at
    ``theta_0``). Alignments are scale-invariant, so alpha does not matter. A plain module needs ``reference=``.
    """
    if reference is not None:
        return model, reference
    from .regimes import AlphaScaled, Linearized

    if isinstance(model, AlphaScaled):
        return model.model, model.f0
    if isinstance(model, Linearized):
        import copy

        ref = copy.deepcopy(model.model)
        named = dict(ref.named_parameters())
        with torch.no_grad():
            for i, n in enumerate(model._names):
                named[n].copy_(getattr(model.theta0, f"p{i}"))
        return model.model, ref
    raise TypeError(
        f"{type(model).__name__} carries no initialization: pass reference= (the model at init, a module of the "
        "same architecture, or its state_dict), or wrap it in AlphaScaled / Linearized")
