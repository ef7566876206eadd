"""Which path an NTK call takes and why, in one place; :func:`explain` shows it with every parameter's form.

Paths (``PATHS``), chosen by :func:`choose_path` for :func:`ntk_gram` and :func:`ntk_alignment`:

| path | what it does |
| --- | --- |
| ``naive`` | one autograd call per example and output (``implementation="naive"``: the spec) |
| ``by_layer`` | one kernel (or alignment) per parameter group, tile by tile (``by_layer=True``) |
| ``cross`` | a cross kernel ``K(X1, X2)`` in tiles (``loader2=``) |
| ``trace_one_block`` | trace kernel of all n examples as one block, one output's backward pass at a time, symmetric products on row blocks (while the block fits ``limits`` ``trace_block_bytes``) |
| ``one_tile`` | full kernel of one block (or trace kernel of at most ``limits`` ``trace_one_tile_max_n`` examples): each layer's features reduced as soon as they exist |
| ``diagonal`` | the per-example ``[k, k]`` blocks, one block of examples at a time |
| ``tiles`` | ``i <= j`` tiles of per-block features, kept while they fit ``max_cache_bytes`` (alignment on Triton: fused ``K_t * K_0`` reduction where blocks are all materialized) |

Within a path, each layer's form (``ghost`` / ``materialized``) is chosen by the cost model of
:func:`lazyhasty.ntk.capture.cost.choose_form`; parameters no per-layer form covers use ``torch.func``.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from torch import nn

from .._loaders import all_inputs
from .._validate import check_model_inputs
from .args import check_args, ntk_backend
from . import tuning
from .blocks import default_block_size, one_trace_block, output_size
from .capture.rules import rule_for
from .featurize import Featurizer
from .._probing import probing

PATHS = {
    "naive": "one autograd call per example and output (the spec)",
    "by_layer": "one kernel per parameter group, tile by tile",
    "cross": "cross kernel K(X1, X2) in tiles",
    "trace_one_block": "trace kernel of all examples in one block, one output's backward pass at a time",
    "one_tile": "one block's kernel (full, or trace of a few examples), each layer's features reduced as soon as "
                "they exist",
    "diagonal": "per-example [k, k] blocks, one block of examples at a time",
    "tiles": "i <= j tiles of per-block features (kept while they fit max_cache_bytes)",
}




def _generic_numel(fz) -> int:
    sizes = {n: p.numel() for n, p in fz.model.named_parameters()}
    return sum(sizes[n] for n in fz.generic)


@dataclass
class PathChoice:
    name: str  # a key of PATHS
    why: str
    block_size: int | None = None


# Paths a call can be sent to by path_override (the others follow from the call's arguments: naive, by_layer,
# cross, and diagonal from kernel='diagonal').
OVERRIDABLE = ("trace_one_block", "one_tile", "tiles")
_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("lazyhasty_ntk_path", default=None)


@contextlib.contextmanager
def path_override(name: str | None):
    """Sends the NTK calls inside the block down the path ``name`` instead of the one `choose_path`
    would take (for tests, which parametrize over paths instead of changing thresholds; and for benchmarks);
    ``explain()`` inside it shows the same choice. None: the usual choice.

    Args:
        name: one of `OVERRIDABLE`: ``"trace_one_block"`` (``kernel="trace"`` only), ``"one_tile"``
            (``ntk_gram``, full or trace kernel: one block of all n), ``"tiles"`` (``block_size`` or the default
            block size; ``ntk_gram`` with ``kernel="full"`` / ``"trace"``, or ``ntk_alignment``).

    Raises:
        ValueError: an unknown path; a call inside the block that the path cannot take (named).

    Example:
        >>> with path_override("trace_one_block"):
        ...     K = ntk_gram(model, x, kernel="trace")
    """
    if name is not None and name not in OVERRIDABLE:
        raise ValueError(f"path_override takes one of {OVERRIDABLE} or None, got {name!r}")
    token = _OVERRIDE.set(name)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def _overridden(name: str, fz, x_all: torch.Tensor, kernel: str, block_size: int | None, purpose: str
                ) -> PathChoice:
    n = x_all.shape[0]
    why = f"path_override({name!r})"
    if name == "trace_one_block":
        if kernel != "trace":
            raise ValueError(f"path_override('trace_one_block') takes kernel='trace', got kernel={kernel!r}")
        return PathChoice(name, why, n)
    if kernel == "diagonal":
        raise ValueError(f"path_override({name!r}) takes kernel='full' or 'trace': kernel='diagonal' is its own path")
    if name == "one_tile":
        if purpose != "gram":
            raise ValueError("path_override('one_tile') is a path of ntk_gram (ntk_alignment reduces tiles)")
        return PathChoice(name, why, n)
    bs = block_size or default_block_size(n, output_size(fz, x_all))
    return PathChoice(name, why + f": {-(-n // bs)} block(s) of {bs}", bs)


def choose_path(fz, x_all: torch.Tensor | None, *, kernel: str, implementation: str, block_size: int | None,
                cross: bool = False, by_layer: bool = False, purpose: str = "gram", backend: str = "torch",
                centered: bool = False) -> PathChoice:
    """The path of one call (see the module docstring); ``fz`` is the call's Featurizer (None for naive).

    Inside :func:`path_override`, its path for the calls that can take it (not naive, by-layer or cross calls).
    """
    if implementation == "naive":
        return PathChoice("naive", "implementation='naive'")
    if by_layer:
        return PathChoice("by_layer", "by_layer=True")
    if cross:
        return PathChoice("cross", "a second example set (loader2=)")
    n = x_all.shape[0]
    forced = _OVERRIDE.get()
    if forced is not None:
        return _overridden(forced, fz, x_all, kernel, block_size, purpose)
    lim = tuning.current()
    if kernel == "trace" and purpose == "gram" and block_size is None and n <= lim.trace_one_tile_max_n:
        return PathChoice("one_tile", f"kernel='trace' on n = {n} <= {lim.trace_one_tile_max_n} examples: one tile of "
                                      "every output's features at once", n)
    if kernel == "trace" and one_trace_block(fz, x_all, block_size):
        why = (f"block_size {block_size} >= n = {n}" if block_size is not None else
               f"all n = {n} examples fit one block (estimated from one example)")
        return PathChoice("trace_one_block", f"kernel='trace' and {why}", n)
    k = output_size(fz, x_all)
    bs = block_size or default_block_size(n, k)
    if block_size is None and not fz.plans and n * k * _generic_numel(fz) * fz.dtype.itemsize <= lim.one_block_jacobian_bytes:
        # whole-model Jacobians of all n examples are small: one vmap and one product beat i <= j tiles, whose
        # per-block overheads dominate at this size (measured: nn.MultiheadAttention n = 64, 2 blocks 1.25x slower)
        bs = n
    nb = -(-n // bs)
    if kernel == "trace" and nb == 1:
        return PathChoice("trace_one_block", f"kernel='trace' and one block of {n} examples (block_size {bs})", n)
    if kernel == "diagonal":
        return PathChoice("diagonal", f"kernel='diagonal': {nb} block(s) of {bs}", bs)
    if nb == 1 and purpose == "gram":
        return PathChoice("one_tile", f"one block of {n} examples (block_size {bs})", bs)
    why = f"{nb} block(s) of {bs}: {nb * (nb + 1) // 2} tiles i <= j"
    if purpose == "alignment" and backend == "triton" and not centered:
        why += "; Triton fuses K_t * K_0 where a block's features are all materialized"
    return PathChoice("tiles", why, bs)


@dataclass
class Plan:
    """What an NTK call on ``model`` and ``x`` does: the path, and per trainable parameter the operation it is
    captured from and its form. ``str(plan)`` is a table for people, ``plan.to_dict()`` the same for code."""

    path: str
    why: str
    kernel: str
    implementation: str
    n: int
    k: int
    block_size: int | None
    parameters: list = field(default_factory=list)
    switches: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"path": self.path, "path_description": PATHS[self.path], "why": self.why, "kernel": self.kernel,
                "implementation": self.implementation, "n": self.n, "k": self.k, "block_size": self.block_size,
                "parameters": [dict(p) for p in self.parameters], "switches": dict(self.switches)}

    @property
    def generic(self) -> list[str]:
        """Parameters on the torch.func fallback (no per-layer form covers them)."""
        return [p["name"] for p in self.parameters if p["form"] == "torch.func"]

    def __str__(self) -> str:
        lines = [f"path: {self.path} ({PATHS[self.path]})", f"  why: {self.why}",
                 f"  kernel={self.kernel!r}, implementation={self.implementation!r}, n={self.n}, k={self.k}, "
                 f"block_size={self.block_size}"]
        lines += [f"  {k}: {v}" for k, v in self.switches.items()]
        lines.append("parameters:")
        w = max((len(p["name"]) for p in self.parameters), default=4)
        for p in self.parameters:
            cost = ""
            if p.get("costs"):
                cost = "  (flops/pair: ghost {ghost:.3g}, materialized {materialized:.3g})".format(**p["costs"])
            copies = f"  copies {'+'.join(p['copies'])}" if p.get("copies") else ""
            fallback = f"  (the layer check moved it here: {p['fallback']})" if p.get("fallback") else ""
            at = f" at {', '.join(p['at_ops'])}" if p.get("at_ops") else ""
            lines.append(f"  {p['name']:<{w}}  {p['module_type']:<14} {p['kind']:<10} {p['form']}{at}{cost}{copies}"
                         f"{fallback}")
        return "\n".join(lines)


@probing("model", loaders=("x",))  # named inputs and output= (lazyhasty._outputs)
def explain(model: nn.Module, x, *, kernel: str = "full", implementation: str = "auto", block_size: int | None = None,
            dtype: torch.dtype | None = None, backend: str | None = None, output=None,
            purpose: str = "gram") -> Plan:
    """The plan an NTK call on `model` and inputs `x` follows: its path and why, and each parameter's capture.

    What [ntk_gram][lazyhasty.ntk.ntk_gram] (`purpose="gram"`) or
    [ntk_alignment][lazyhasty.ntk.ntk_alignment] (`"alignment"`) with the same arguments does, without
    computing the kernel: the path (a key of `PATHS`) and why it was chosen, and per trainable parameter the
    module it belongs to, how its per-example gradients `J_i = d f(x_i) / d theta` are captured (its `kind`) and
    the form of its kernel term `J_i . J_j` (its `form`):

    - `kind` `"linear"` / `"conv"` / `"convT"` / `"embedding"` / `"norm"`: one layer's captured input and
      output gradient, in `form` `"ghost"` (position Grams, never forming `J_i`) or `"materialized"` (`J_i`
      formed), whichever the cost model's flops per example pair (`costs`) make cheaper;
    - `kind` `"broadcast"`, `form` `"per-example copies"`: a parameter the model broadcasts against the batch
      (class tokens, position embeddings looked up on a `[1, L]` buffer, layer scales, norm affines), replaced
      by `b` copies of itself, or at the operations named in `at_ops` (`mul`, `add`, `layer_norm`,
      `batch_norm`, `scaled_dot_product_attention`, ...) by copies of the tensor computed from it: example
      `i`'s gradient is copy `i`'s;
    - `kind` `"generic"`, `form` `"torch.func"`: on the exact `vmap(jacrev)` fallback; `fallback` says why
      when the layer check moved it there (the check's mismatch, or the error a layout or a stand-in raised on
      the layer's captured tensors), so a parameter on the slower path is never unseen.

    `copies` lists `"input"` / `"output"` where in-place ops made capture copy a layer's tensors. The layer
    check runs on up to 8 examples of `x` (on a perturbed copy of the model; cached per model structure, as
    every call does), so a later call on the same model starts at once.

    Args:
        model: the network; its output `[n, k]` (or picked by `output`).
        x: the inputs `[n, ...]`, or an iterable of batches.
        kernel: `"full"`, `"trace"` or `"diagonal"`, as in `ntk_gram`.
        implementation: `"auto"` (default), `"layerwise"`, `"jacobian"` or `"naive"`.
        block_size: examples a tile, as in `ntk_gram` (None: the default).
        dtype: the computation's dtype (None: the parameters').
        backend: `"torch"`, `"triton"` or `"cpp"` (None: the default for the device).
        output: picks the tensor the kernel is of from a tuple / dict / `ModelOutput` output: an index, a key
            or a callable.
        purpose: `"gram"` (an `ntk_gram` call) or `"alignment"` (an `ntk_alignment` call).

    Returns:
        A `Plan`: `path`, `why`, `kernel`, `implementation`, `n`, `k`, `block_size` and `parameters` (one
        dict a trainable parameter, in `named_parameters` order: `name`, `shape`, `module`, `module_type`,
        `kind`, `form`, `costs`, `copies`, `fallback`, `at_ops`) and `switches` (the call's other implicit
        choices, each saying why: `backend`, `layer check` (on a perturbed copy or on the model itself),
        `input layout` (channels-last or contiguous), `output gradients` (one batched backward or k passes, for
        the examples explained), `alignment reduction`); `plan.generic` names those on torch.func;
        `str(plan)` is a table, `plan.to_dict()` the same as plain data.

    Raises:
        ValueError: an unknown `kernel`, `implementation` or `purpose`, a bad `block_size` or `dtype`, a model
            whose examples are not independent (batch statistics, active dropout), or non-finite inputs.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lazyhasty.ntk import explain
        >>> class Scaled(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(3, 2)
        ...         self.gamma = nn.Parameter(torch.ones(2))  # a layer scale, broadcast over the batch
        ...     def forward(self, x):
        ...         return self.fc(x) * self.gamma
        >>> plan = explain(Scaled(), torch.randn(4, 3), kernel="trace")
        >>> for p in plan.parameters:
        ...     print(p["name"], str(p["kind"]), p["form"], p["at_ops"])
        gamma broadcast per-example copies ['mul']
        fc.weight linear ghost None
        fc.bias linear ghost None
        >>> plan.generic   # every parameter has a per-layer form
        []
    """
    check_args(kernel, implementation, block_size, 0, dtype)
    if purpose not in ("gram", "alignment"):
        raise ValueError(f"purpose must be 'gram' or 'alignment', got {purpose!r}")
    check_model_inputs(None, model=model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if implementation == "naive":
        x_all = all_inputs(x, next(model.parameters()).device)
        check_model_inputs(x_all, model=model)
        choice = choose_path(None, x_all, kernel=kernel, implementation="naive", block_size=block_size)
        with torch.enable_grad():
            k = int(model(x_all[:1]).reshape(1, -1).shape[1])
        params = [_row(model, n, p, "generic", "autograd") for n, p in named]
        return Plan(choice.name, choice.why, kernel, implementation, x_all.shape[0], k, None, params)
    fz = Featurizer(model, implementation, kernel, dtype)
    be = ntk_backend(fz.device, backend, fz.dtype)
    x_all = all_inputs(x, fz.device)
    check_model_inputs(x_all, model=model)
    n = x_all.shape[0]
    fz.plan_for_pairs((n + 1) / 2)
    choice = choose_path(fz, x_all, kernel=kernel, implementation=implementation, block_size=block_size,
                         purpose=purpose, backend=be)
    with torch.enable_grad():
        fz(x_all[: min(n, 8)])  # forms depend on layer shapes only; this also runs (and caches) the layer check
    why = choice.why + (f"; implementation='auto' -> {fz.auto_reason}" if fz.auto_reason else "")
    by_param = {}
    for p in fz.plans:
        copies = [w for w, on in (("input", p.copy_input), ("output", p.copy_output)) if on]
        for attr, t in p.params():
            by_param[id(t)] = (p, copies)
    copied = set(fz.per_example_copies())
    at_ops = fz.copy_ops()
    copy_why = fz.copy_failures()
    rows = []
    for name, t in named:
        if id(t) in by_param:
            plan, copies = by_param[id(t)]
            rule = rule_for(plan)
            form = plan.form or rule.default_form
            costs = ({f: plan.costs[f] for f in ("ghost", "materialized")}  # flops a pair, forming included
                     if plan.costs and rule.chooses_form else None)
            rows.append(_row(model, name, t, plan.kind, form, costs, copies))
        elif name in copied:
            rows.append(_row(model, name, t, "broadcast", "per-example copies", ops=at_ops.get(name)))
        else:
            reason = fz.fallback_reasons.get(name)
            if name in copy_why:
                reason = f"{reason}; {copy_why[name]}" if reason else copy_why[name]
            rows.append(_row(model, name, t, "generic", "torch.func", fallback=reason))
    return Plan(choice.name, why, kernel, fz.implementation if implementation != "auto" else "auto", n,
                int(fz.k or 0), choice.block_size, rows, _switches(fz, be, kernel, purpose))


def _switches(fz, backend: str, kernel: str, purpose: str) -> dict:
    """The implicit choices of a call besides its path, each with why (``Plan.switches``)."""
    from .walk import fused_alignment

    out = {"backend": backend}
    if fz.plans and not fz.verified:
        out["layer check"] = "not decided: every gradient was zero on these examples (it runs again next call)"
    elif fz.plans:
        out["layer check"] = ("on a perturbed copy of the model, once per structure" if fz.twin_fits() else
                              "on the model itself (it holds more than limits twin_max_bytes), once per structure")
    if any(isinstance(m, nn.Conv2d) for m in fz.model.modules()):
        out["input layout"] = ("channels-last (faster convolutions)" if fz.channels_last else
                               "contiguous (the model failed on channels-last inputs)")
    if fz.backward_used:
        out["output gradients"] = fz.backward_used
    changed = tuning.current().changed()
    if changed:  # inside a limits() block: the thresholds the switches above were decided by
        out["limits"] = ", ".join(f"{name}={v} (default {d})" for name, (v, d) in changed.items())
    if purpose == "alignment":
        out["alignment reduction"] = ("the fused Triton K_t * K_0 reduction of materialized tiles"
                                      if fused_alignment(backend, kernel, False) else "torch products of each tile")
    return out


def _row(model, name, t, kind, form, costs=None, copies=(), fallback=None, ops=None) -> dict:
    owner = name.rpartition(".")[0]
    module = dict(model.named_modules()).get(owner)
    return {"name": name, "shape": list(t.shape), "module": owner, "module_type": type(module).__name__,
            "kind": kind, "form": form, "costs": costs, "copies": list(copies), "fallback": fallback,
            "at_ops": list(ops) if ops else None}
