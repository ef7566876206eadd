"""Per-model caches, in one place: each is a ``WeakKeyDictionary`` keyed by the user's model (freed with it),
holding what was decided for one structure and state: the layer check's verdict, which fallback parameters may
be copied per example, the batch-mixing checks, torch.func's and the batched backward's checks, the capture
sites, the one-block trace size, the output size and the input checks' trial forwards. Each entry carries the structure key it
was decided for, so a changed model is checked anew; :func:`forget` drops a model from all of them.
"""
from __future__ import annotations

import weakref

from torch import nn

from ..._validate import TRIAL_PASSED  # (the input checks' trial forwards that passed, kept where they run)

# nn.MultiheadAttention -> its InProjection (capture/sites.py)
IN_PROJECTIONS: "weakref.WeakKeyDictionary[nn.MultiheadAttention, object]" = weakref.WeakKeyDictionary()
# nn.RNNBase -> {name: RecurrentProjection}
RECURRENT: "weakref.WeakKeyDictionary[nn.RNNBase, dict]" = weakref.WeakKeyDictionary()
# model -> {(structure, input shape): matmul sites found by one forward}
SITES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# module -> whether its forward is one direct F.linear call on its own weight (capture/plan.py affine_candidate)
DIRECT: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
# Per model and implementation ("layerwise" / "jacobian"): the layer check's Verdict (structure fingerprint,
# modules moved to the fallback and why, ...) once the layerwise gradients were checked against autograd. Whether
# a weight is also used outside its module is a property of the model's code, so later calls on the same structure
# skip the extra backward pass; any change of modules or parameters (objects, shapes, requires_grad) redoes it.
VERIFIED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# Per model: (fingerprint, input shape and dtype, {fallback parameter name: whether its per-example copies passed
# the check}).
COPYABLE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# Per model: {fallback parameter name: why its per-example stand-ins could not be formed} (explain()).
COPY_WHY: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# Per model: (key: structure and state, example shape, dtype, device; the block sizes whose batch-mixing check
# passed).
MIXING_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# Per model: {(structure, block shape, dtype, parameter names): whether torch.func's Jacobian agreed with autograd}
VMAP_CHECKED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# Per model: {(structure, block shape, dtype, captured shapes): whether the batched backward agreed (None: unchecked)}
BATCHED_CHECKED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# Per model: (structure, example shape, plan) and the elements one example takes in a one-block trace kernel.
TRACE_SIZES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

# Per model: (structure, example shape, dtypes, device) and the number of outputs k of one example.
OUTPUT_SIZES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

# Per model: {(structure, block shape, dtype, device, threads): {"k", "bytes", "batched": [s], "replicated": [s]}}:
# the measured times of a verified block's output gradients each way (Featurizer._replicas).
REPLICATED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()

ALL = (IN_PROJECTIONS, RECURRENT, SITES, DIRECT, VERIFIED, COPYABLE, COPY_WHY, MIXING_CHECKED, VMAP_CHECKED,
       BATCHED_CHECKED, TRACE_SIZES, OUTPUT_SIZES, REPLICATED, TRIAL_PASSED)


def forget(model: nn.Module) -> None:
    """Drop everything decided for ``model`` and its modules: the next call checks it anew.

    Args:
        model: a model the engine has seen (or any module; unknown ones are ignored).
    """
    modules = list(model.modules()) if isinstance(model, nn.Module) else [model]
    for cache in ALL:
        for m in modules:
            cache.pop(m, None)
