"""Which tensor of a model's output the probes measure, and models that take named inputs.

Models of outside libraries rarely return a bare tensor: a Hugging Face model returns a ``ModelOutput``
(``.logits``), others a dict or a tuple. `output_tensor` picks the tensor: the ``output=`` a user gave
(an index, a key, an attribute name or a callable), else the output itself when it is a tensor, else its
``logits`` (attribute or key). `ProbeModel` wraps a model so that it is a function of one tensor with
one tensor out, which is what the tangent-kernel engine and the losses take: it picks the output and, for a
model called with named inputs (``model(input_ids=..., attention_mask=...)``), unpacks them from one packed
``[n, d]`` tensor (`pack_inputs`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["InputPacking", "ProbeModel", "output_tensor", "pack_inputs"]

# a probe batch's keys that are targets, not inputs (the Trainer's own "labels" convention)
TARGET_KEYS = ("labels", "label", "label_ids")


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
                raise TypeError(f"output={output!r} cannot pick from the {type(out).__name__} {what} returned "
                                f"({exc})") from None
        if not isinstance(picked, torch.Tensor):
            raise TypeError(f"output={output!r} picked a {type(picked).__name__} from {what}'s output, not a tensor")
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


class InputPacking:
    """How named inputs ``{key: [n, ...] tensor}`` are packed into one ``[n, d]`` tensor and back.

    All-integer (or bool) inputs pack as int64, losslessly; a mix with floating-point inputs packs as float64
    (integers below 2**24 survive the cast to a float32 model's dtype: token ids, masks, positions).
    """

    def __init__(self, keys: tuple, shapes: tuple, dtypes: tuple):
        self.keys, self.shapes, self.dtypes = keys, shapes, dtypes
        self.sizes = tuple(int(torch.Size(s).numel()) for s in shapes)
        self.dtype = torch.int64 if not any(d.is_floating_point for d in dtypes) else torch.float64

    def describe(self) -> dict:
        return {k: [list(s), str(d).replace("torch.", "")] for k, s, d in zip(self.keys, self.shapes, self.dtypes)}

    def unpack(self, packed: torch.Tensor) -> dict:
        if packed.dim() != 2 or packed.shape[1] != sum(self.sizes):
            raise ValueError(f"packed inputs must be [n, {sum(self.sizes)}], got {tuple(packed.shape)}")
        n, parts = packed.shape[0], packed.split(list(self.sizes), dim=1)
        return {k: p.reshape(n, *s).to(d) for k, p, s, d in zip(self.keys, parts, self.shapes, self.dtypes)}


def pack_inputs(batch: Mapping, packing: InputPacking | None = None, name: str = "the probe batch"):
    """Named inputs as one tensor: ``(packed [n, d], packing)``; target keys (``labels``) are dropped.

    Args:
        batch: ``{key: tensor [n, ...]}``, every value with the same ``n``; non-tensor values are refused.
        packing: the packing to follow (another batch's: the same keys, per-example shapes and dtypes); default:
            the one this batch defines.
        name: what ``batch`` is, for error messages.

    Returns:
        ``(packed, packing)``.

    Raises:
        TypeError, ValueError: a value that is not a tensor, rows that differ, or keys / shapes / dtypes that
            differ from ``packing``'s (each names the key).
    """
    items = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
    if not items:
        raise ValueError(f"{name} has no input keys (got {sorted(map(str, batch))})")
    for k, v in items.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            raise TypeError(f"{name}[{k!r}] must be a tensor [n, ...] (named inputs are passed as keyword "
                            f"arguments), got {type(v).__name__}")
        if v.device.type == "meta":
            raise ValueError(f"{name}[{k!r}] is on the meta device: it holds no values")
    rows = {k: v.shape[0] for k, v in items.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"the inputs of {name} have different numbers of rows: {rows}")
    keys = tuple(items)
    shapes = tuple(tuple(v.shape[1:]) for v in items.values())
    dtypes = tuple(v.dtype for v in items.values())
    if packing is None:
        packing = InputPacking(keys, shapes, dtypes)
    elif (keys, shapes, dtypes) != (packing.keys, packing.shapes, packing.dtypes):
        raise ValueError(f"{name} has inputs {InputPacking(keys, shapes, dtypes).describe()}, but the probe set "
                         f"{packing.describe()}: the same keys, per-example shapes and dtypes are needed")
    n = next(iter(rows.values()))
    packed = torch.cat([v.reshape(n, -1).to(packing.dtype) for v in items.values()], dim=1)
    return packed, packing


class ProbeModel(nn.Module):
    """``model`` as a function of one tensor with one tensor out, for the probes.

    ``forward(x)`` is ``output_tensor(model(x), output)``, or with ``packing``
    ``output_tensor(model(**packing.unpack(x)), output)``. The model is the only child, so parameter and module
    names gain a ``model.`` prefix (the same for a model and its reference).

    Args:
        model: the module measured.
        output: which tensor of its output (see `output_tensor`).
        packing: how named inputs were packed (`pack_inputs`); ``None``: the model takes ``x`` itself.
    """

    def __init__(self, model: nn.Module, output=None, packing: InputPacking | None = None):
        super().__init__()
        self.model, self.output, self.packing = model, output, packing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(**self.packing.unpack(x)) if self.packing is not None else self.model(x)
        return output_tensor(out, self.output, type(self.model).__name__)
