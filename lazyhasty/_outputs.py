"""Which tensor of a model's output the probes measure, and how a batch of named inputs reaches the model.

**Outputs.** Models of outside libraries rarely return a bare tensor: a Hugging Face model returns a
``ModelOutput`` (``.logits``), others a dict or a tuple. `output_tensor` picks the tensor every entry point
measures: the ``output=`` a user gave (an index, a key, an attribute name or a callable), else the output
itself when it is a tensor, else its ``logits`` (attribute or key); anything else is an error asking for
``output=``.

**Named inputs.** A batch may be a mapping of tensors (a Hugging Face collator's ``{"input_ids": ...,
"attention_mask": ..., "labels": ...}``), or a tuple/list whose first element is one. Its *inputs* are every
key except the target keys :data:`TARGET_KEYS` (``labels``, ``label``, ``label_ids``), and the model is called
``model(**inputs)``. Every value must be a tensor ``[n, ...]`` with the same ``n`` (examples are counted along
dim 0 of every input; rows that disagree are an error naming the keys), and every batch has the same keys,
per-example shapes and dtypes (pad sequences to one length). A mapping with the key ``"x"`` is the older form
and keeps its meaning: ``batch["x"]`` is the one positional input, the other keys are ignored.

**One place.** :func:`lazyhasty._probing.probing` (a decorator on every entry point: ``ntk_gram``, ``ntk_alignment``, ``explain``,
``KernelOperator``, ``ntk_eigh``, ``kernel_matvec``, ``sign_similarity``, ``representation_alignment``,
``SignPatterns``, ``NTKReference``, ``LinearityProbe``) turns (model, loader, output) into what the engine
runs: the named inputs of each batch packed into one tensor ``[n, d]`` (`InputPacking`; one input key: that
tensor itself), and, while the call runs, the model's ``forward`` taking that tensor, unpacking it into keyword
arguments and returning the picked output tensor (`ProbeCall`). The model object itself is measured, so
parameter and module names (``by_layer`` keys, ``explain()``'s rows, error messages) are the model's own and
the per-model caches of the layer checks hold across calls; the call's description enters those caches' keys
(``_lazyhasty_call``). Only a model whose root is an ``nn.MultiheadAttention`` or a recurrent module (whose
``forward`` the capture replaces) is wrapped instead (`ProbeModel`: names gain a ``model.`` prefix).
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["TARGET_KEYS", "InputPacking", "ProbeCall", "ProbeModel", "output_tensor", "pack_inputs"]

# a probe batch's keys that are targets, not inputs (the Trainer's own "labels" convention)
TARGET_KEYS = ("labels", "label", "label_ids")

_CALL, _KEY, _BASE = "_lazyhasty_probe", "_lazyhasty_call", "_lazyhasty_forward"


class OutputError(TypeError, ValueError):
    """``output=`` cannot pick from what the model returned (a TypeError and a ValueError: both were raised
    for it before the entry points shared one picker)."""


def output_tensor(out, output: int | str | Callable | None = None, what: str = "the model") -> torch.Tensor:
    """The tensor of ``out`` (a model's output) the probes measure.

    Args:
        out: what the model returned: a tensor, a Hugging Face ``ModelOutput``, a dict, a tuple or a list.
        output: how to pick the tensor: an index (tuple/list), a key (dict, ``ModelOutput``) or attribute
            name, or a callable ``out -> tensor``. Default ``None``: ``out`` itself when it is a tensor, else its
            ``logits`` (attribute or key).
        what: who returned ``out``, for the error message.

    Returns:
        The picked tensor, ``[n, ...]``.

    Raises:
        TypeError: nothing to pick (names what was returned and how to choose).

    Example:
        >>> output_tensor({"logits": torch.zeros(2, 3), "loss": torch.tensor(1.0)}).shape
        torch.Size([2, 3])
    """
    if output is not None:
        if callable(output):
            picked = output(out)
        elif isinstance(output, str) and not isinstance(out, Mapping) and hasattr(out, output):
            picked = getattr(out, output)
        else:
            try:
                picked = out[output]
            except (KeyError, IndexError, TypeError) as exc:
                raise OutputError(f"output={output!r} cannot pick from the {type(out).__name__} {what} returned: "
                                  f"it has no tensor {output!r} ({exc})") from None
        if not isinstance(picked, torch.Tensor):
            raise OutputError(f"output={output!r} picked a {type(picked).__name__} from {what}'s output, not a "
                              "tensor")
        return picked
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    kind = type(out).__name__
    keys = f" with keys {list(out)[:5]}" if isinstance(out, Mapping) else (
        f" of {len(out)} items" if isinstance(out, (tuple, list)) else "")
    raise TypeError(f"{what} returned a {kind}{keys}, not a tensor and without logits: pass output= (an index, a "
                    "key, or a callable such as lambda out: out.hidden_states[-1]) to choose the tensor to measure")


def tensor_output(out, what: str = "the model"):
    """``out`` as the engine measures it without ``output=``: a tensor, or its logits (`output_tensor`)."""
    return output_tensor(out, None, what)


def check_output(output) -> None:
    """Raise ``TypeError`` for an ``output=`` that is not ``None``, an index, a key or a callable."""
    if output is not None and (not (callable(output) or isinstance(output, (int, str))) or isinstance(output, bool)):
        raise TypeError(f"output= must be an index, a key or a callable, got {output!r}")


class InputPacking:
    """How named inputs ``{key: [n, ...] tensor}`` are packed into one tensor and back.

    One input key: the tensor itself (nothing is copied or cast). Several: ``[n, d]``, ``d`` the sum of the
    per-example sizes; all-integer (or bool) inputs pack as int64, losslessly; a mix with floating-point inputs
    packs as float64 (integers below 2**24 survive a cast to a float32 model's dtype: token ids, masks,
    positions). Unpacked, integer inputs get their own dtype back and floating-point ones the model's.
    """

    def __init__(self, keys: tuple, shapes: tuple, dtypes: tuple):
        self.keys, self.shapes, self.dtypes = tuple(keys), tuple(shapes), tuple(dtypes)
        self.sizes = tuple(int(torch.Size(s).numel()) for s in shapes)
        self.single = len(self.keys) == 1
        self.dtype = (self.dtypes[0] if self.single else
                      torch.int64 if not any(d.is_floating_point for d in dtypes) else torch.float64)

    def __eq__(self, other) -> bool:
        return isinstance(other, InputPacking) and (self.keys, self.shapes, self.dtypes) == (
            other.keys, other.shapes, other.dtypes)

    def __hash__(self) -> int:
        return hash((self.keys, self.shapes, self.dtypes))

    def describe(self) -> dict:
        return {k: [list(s), str(d).replace("torch.", "")] for k, s, d in zip(self.keys, self.shapes, self.dtypes)}

    def unpack(self, packed: torch.Tensor, float_dtype: torch.dtype | None = None) -> dict:
        """``{key: [n, ...]}`` from ``packed``; floating-point inputs in ``float_dtype`` (default: as packed for
        one key, their own dtype for several)."""
        def cast(t, d):
            want = (float_dtype or (t.dtype if self.single else d)) if d.is_floating_point else d
            return t if t.dtype == want else t.to(want)

        if self.single:
            return {self.keys[0]: cast(packed, self.dtypes[0])}
        if packed.dim() != 2 or packed.shape[1] != sum(self.sizes):
            raise ValueError(f"packed inputs must be [n, {sum(self.sizes)}], got {tuple(packed.shape)}")
        n, parts = packed.shape[0], packed.split(list(self.sizes), dim=1)
        return {k: cast(p.reshape(n, *s), d) for k, p, s, d in zip(self.keys, parts, self.shapes, self.dtypes)}


def named_batch(batch) -> Mapping | None:
    """The mapping of named inputs a batch is (or starts with: ``(inputs, labels)``); ``None`` for a tensor, a
    tuple of tensors or the older ``{"x": ...}`` form."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Mapping):
        batch = batch[0]
    if isinstance(batch, Mapping) and "x" not in batch:
        return batch
    return None


def pack_inputs(batch: Mapping, packing: InputPacking | None = None, name: str = "the probe batch"):
    """Named inputs as one tensor: ``(packed [n, ...], packing)``; target keys (``labels``) are dropped.

    Args:
        batch: ``{key: tensor [n, ...]}``, every value with the same ``n``; non-tensor values are refused.
        packing: the packing to follow (another batch's: the same keys, per-example shapes and dtypes); default:
            the one this batch defines.
        name: what ``batch`` is, for error messages.

    Returns:
        ``(packed, packing)``: ``packed`` is ``[n, d]`` (several inputs) or the one input itself.

    Raises:
        TypeError, ValueError: a value that is not a tensor, no input key, rows that differ, or keys / shapes /
            dtypes that differ from ``packing``'s (each names the keys).

    Example:
        >>> x, p = pack_inputs({"ids": torch.zeros(4, 5, dtype=torch.long), "mask": torch.ones(4, 5),
        ...                     "labels": torch.zeros(4)})
        >>> x.shape, p.keys
        (torch.Size([4, 10]), ('ids', 'mask'))
    """
    items = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
    if not items:
        raise ValueError(f"{name} has no input keys (got {sorted(map(str, batch))}; {list(TARGET_KEYS)} are "
                         "targets, not inputs)")
    for k, v in items.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            raise TypeError(f"{name}[{k!r}] must be a tensor [n, ...] (every key but {list(TARGET_KEYS)} is an input, "
                            f"passed to the model as a keyword argument), got {type(v).__name__}: drop the keys that "
                            "are not inputs from the batches")
        if v.device.type == "meta":
            raise ValueError(f"{name}[{k!r}] is on the meta device: it holds no values")
    rows = {k: v.shape[0] for k, v in items.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"the inputs of {name} have different numbers of rows (examples, dim 0): {rows}; every "
                         "input must hold one row per example")
    keys = tuple(items)
    shapes = tuple(tuple(v.shape[1:]) for v in items.values())
    dtypes = tuple(v.dtype for v in items.values())
    if packing is None:
        packing = InputPacking(keys, shapes, dtypes)
    elif (keys, shapes, dtypes) != (packing.keys, packing.shapes, packing.dtypes):
        raise ValueError(f"{name} has inputs {InputPacking(keys, shapes, dtypes).describe()}, but the probe set "
                         f"{packing.describe()}: the same keys, per-example shapes and dtypes are needed")
    if packing.single:
        return next(iter(items.values())), packing
    n = next(iter(rows.values()))
    devices = {v.device for v in items.values()}
    if len(devices) != 1:
        raise ValueError(f"the inputs of {name} are on different devices: {({k: str(v.device) for k, v in items.items()})}")
    packed = torch.cat([v.reshape(n, -1).to(packing.dtype) for v in items.values()], dim=1)
    return packed, packing


class ProbeModel(nn.Module):
    """``model`` as a function of one tensor with one tensor out, as a wrapping module.

    ``forward(x)`` is ``output_tensor(model(x), output)``, or with ``packing``
    ``output_tensor(model(**packing.unpack(x)), output)``. The model is the only child, so parameter and module
    names gain a ``model.`` prefix (the same for a model and its reference). The entry points use it only for
    a root whose forward the capture replaces (`ProbeCall`); :class:`lazyhasty.Monitor` keeps one per model.

    Args:
        model: the module measured.
        output: which tensor of its output (see `output_tensor`).
        packing: how named inputs were packed (`pack_inputs`); ``None``: the model takes ``x`` itself.
    """

    def __init__(self, model: nn.Module, output=None, packing: InputPacking | None = None):
        super().__init__()
        self.model, self.output, self.packing = model, output, packing

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.packing is not None and len(args) == 1 and not kwargs:
            out = self.model(**self.packing.unpack(args[0], _float_dtype(self.model)))
        else:
            out = self.model(*args, **kwargs)
        return output_tensor(out, self.output, type(self.model).__name__)


SelectOutput = ProbeModel


def select_output(model: nn.Module, output) -> nn.Module:
    """``model`` itself (``output=None``: the engine takes a tensor or its logits), else a `ProbeModel`."""
    check_output(output)
    return model if output is None else ProbeModel(model, output)


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _output_key(output) -> str:
    """``output=`` for the per-model cache keys: a new lambda of the same source and closure is the same."""
    if output is None or isinstance(output, (int, str)):
        return repr(output)
    code = getattr(output, "__code__", None)
    if code is None:
        return f"object {id(output)}"
    cells = tuple(c.cell_contents if isinstance(c.cell_contents, (int, float, str, bool, type(None)))
                  else id(c.cell_contents) for c in (output.__closure__ or ()))
    return repr((code.co_filename, code.co_firstlineno, id(code), cells, getattr(output, "__defaults__", None)))


def _probe_forward(self, *args, **kwargs):
    """A patched model's ``forward``: packed named inputs unpacked into keyword arguments, the output picked."""
    call = self.__dict__[_CALL]
    if call.packing is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        args, kwargs = (), call.packing.unpack(args[0], _float_dtype(self))
    base = self.__dict__.get(_BASE)
    out = base(*args, **kwargs) if base is not None else type(self).forward(self, *args, **kwargs)
    if call.output is None and not isinstance(out, torch.Tensor) and not isinstance(
            out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None), torch.Tensor):
        return out  # nothing to pick by default: a probe of inner layers (signs) needs none, the engine says so
    return output_tensor(out, call.output, type(self).__name__)


class ProbeCall:
    """How an entry point calls its models: the packing of its named inputs and the output it measures.

    Args:
        output: ``output=`` (see `output_tensor`); ``None``: a tensor or its logits.
        packing: the named inputs' `InputPacking`; ``None``: the batches are tensors.
    """

    def __init__(self, output=None, packing: InputPacking | None = None):
        self.output, self.packing = output, packing

    @property
    def active(self) -> bool:
        return self.output is not None or self.packing is not None

    @property
    def key(self) -> str:
        return repr((None if self.packing is None else self.packing.describe(), _output_key(self.output)))

    def merged(self, inner: ProbeCall) -> ProbeCall:
        """This call with a nested entry point's: its packing if it has one, its output if it names one."""
        return ProbeCall(self.output if inner.output is None else inner.output, inner.packing or self.packing)

    def pack(self, batch, name: str):
        """One batch for the engine: its named inputs packed (`pack_inputs`), a tensor batch as it is."""
        if self.packing is None:
            return batch
        named = named_batch(batch)
        if named is None:
            raise TypeError(f"{name} is a {type(batch).__name__}, but the first batch was a dict of named inputs "
                            f"{list(self.packing.keys)}: every batch must be one")
        return pack_inputs(named, self.packing, name)[0]

    @contextlib.contextmanager
    def on(self, *models):
        """While the block runs, each module of ``models`` takes this call's packed inputs and returns its
        picked output (its ``forward`` patched on the instance, restored after). Yields the models to run
        (the same objects; a `ProbeModel` around a root whose forward the capture replaces)."""
        if not self.active:
            yield models
            return
        undo, out = [], []
        try:
            for m in models:
                if isinstance(m, (nn.MultiheadAttention, nn.RNNBase)):
                    out.append(m if isinstance(m, ProbeModel) else ProbeModel(m, self.output, self.packing))
                    continue
                if isinstance(m, nn.Module):
                    if self.packing is not None:
                        _check_keywords(m, self.packing.keys)
                    undo.append(_patch(m, self))
                out.append(m)
            yield tuple(out)
        finally:
            for u in reversed(undo):
                u()


def _check_keywords(m: nn.Module, keys: tuple) -> None:
    """Raise ``ValueError`` when ``m``'s forward cannot take the named inputs ``keys`` as keyword arguments
    (before the first call, instead of torch's or Python's message from deep inside it)."""
    forward = m.__dict__.get(_BASE) or m.__dict__.get("forward") or type(m).forward
    if m.__dict__.get(_CALL) is not None:
        forward = m.__dict__.get(_BASE) or type(m).forward
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):  # a builtin or C forward: nothing to read, the call itself will tell
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    unknown = [k for k in keys if k not in names]
    if unknown:
        raise ValueError(f"the batches' named inputs {list(keys)} are passed to {type(m).__name__} as keyword "
                         f"arguments, but its forward takes {names}: {unknown} match none. Name the keys after "
                         "forward's arguments, or give a model of one positional input a tensor or {'x': tensor} "
                         "batch")


def _patch(m: nn.Module, call: ProbeCall):
    d = m.__dict__
    saved = {k: d[k] for k in (_CALL, _KEY, _BASE, "forward") if k in d}
    prev = d.get(_CALL)
    if prev is not None:
        call = prev.merged(call)
    elif "forward" in d:  # an instance forward of the model's own: the probe runs through it
        d[_BASE] = d["forward"]
    d[_CALL], d[_KEY] = call, call.key
    d["forward"] = _probe_forward.__get__(m)

    def undo():
        for k in (_CALL, _KEY, _BASE, "forward"):
            d.pop(k, None)
        d.update(saved)
    return undo


def current_call(model) -> ProbeCall:
    """The `ProbeCall` a model runs under now (an inactive one outside every entry point)."""
    return getattr(model, "__dict__", {}).get(_CALL) or ProbeCall()
