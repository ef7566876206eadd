"""The one place an entry point's (model, loader, output) become what the engine runs (:mod:`lazyhasty._outputs`).

`probing` decorates every entry point: it reads the loaders' first batches, packs named inputs
(`probe_call`; over a ``process_group`` the ranks agree on one packing), resolves the reference, and runs the
entry point with the models under a :class:`lazyhasty._outputs.ProbeCall` (their ``forward`` taking the packed
inputs and returning the picked output) and ``output=None``. `reapplying` does the same for the later methods
of an object an entry point made (``NTKReference.measure``, ``LinearityProbe.measure``,
``KernelOperator.__call__``).
"""
from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Iterable, Mapping

import torch

from . import _dist
from ._loaders import as_reference_module, model_and_reference
from ._outputs import ProbeCall, check_output, named_batch, pack_inputs

__all__ = ["probe_call", "probing", "reapplying"]


class _Packed:
    """A loader whose batches of named inputs come out packed (re-iterable when the source is)."""

    def __init__(self, source, call: ProbeCall):
        self.source, self.call = source, call

    def __iter__(self):
        for i, batch in enumerate(self.source):
            yield self.call.pack(batch, f"batch {i}")


class _Resumed:
    """A re-iterable loader whose first pass goes on from the iterator its first batch was read from, so that
    reading that batch costs no second pass (a DataLoader's workers started twice, a dataset read twice);
    every later pass iterates the loader anew."""

    def __init__(self, loader, first, it):
        self.loader, self._pending = loader, (first, it)

    def __iter__(self):
        pending, self._pending = self._pending, None
        return iter(self.loader) if pending is None else itertools.chain([pending[0]], pending[1])


def _first(loader):
    """``(first batch or None, the loader to iterate instead)``: the first pass goes on from the batch read."""
    if isinstance(loader, torch.Tensor) or loader is None or not isinstance(loader, Iterable):
        return None, loader
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        return None, loader if it is not loader else []
    return first, (_Resumed(loader, first, it) if it is not loader else itertools.chain([first], it))


def probe_call(loaders: list, output=None, group=None) -> tuple[ProbeCall, list]:
    """``(call, loaders)``: the `ProbeCall` of an entry point's loaders and ``output=``, and the loaders as
    the engine takes them (named inputs packed). Every loader must hold named inputs or none; with a
    ``group`` (``torch.distributed``) the ranks agree on one packing (a rank with an empty shard takes the
    others'), and a rank whose batches cannot be packed fails on every rank."""
    check_output(output)
    packing, out, err, plain = None, [], None, None  # plain: the first set holding tensors, not named inputs
    try:
        for j, loader in enumerate(loaders):
            name = "the probe set" if j == 0 else "the second example set"
            if isinstance(loader, Mapping) and named_batch(loader) is not None:  # the whole set as one dict
                x, packing = pack_inputs(loader, packing, name)
                out.append(x)
            else:
                first, loader = _first(loader)
                named = None if first is None else named_batch(first)
                if named is not None:
                    _, packing = pack_inputs(named, packing, f"batch 0 of {name}")
                    out.append(_Packed(loader, None))  # its call is set below, once the packing is agreed
                else:
                    if first is not None or (isinstance(loader, torch.Tensor) and loader.numel()):
                        plain = plain or name
                    out.append(loader)
            if packing is not None and plain is not None:
                raise TypeError(f"{plain} holds tensors but another set named inputs {list(packing.keys)}: give "
                                "every set as dicts of named inputs, or none")
    except (TypeError, ValueError) as exc:
        err = exc
    if group is not None:
        mine = (packing, plain is not None, None if err is None else f"{type(err).__name__}: {err}")
        everyone = _dist.gather_objects(mine, group)
        if err is not None:
            raise err
        for r, (_, _, msg) in enumerate(everyone):
            if msg is not None:
                raise ValueError(f"rank {r} failed reading its probe shard ({msg})")
        known = [(r, p) for r, (p, _, _) in enumerate(everyone) if p is not None]
        for r, p in known[1:]:
            if p != known[0][1]:
                raise ValueError(f"the ranks' probe shards have different named inputs: rank {known[0][0]} "
                                 f"{known[0][1].describe()}, rank {r} {p.describe()}")
        tensors = [r for r, (_, t, _) in enumerate(everyone) if t]
        if known and tensors:
            raise ValueError(f"rank {known[0][0]}'s probe shard has named inputs {list(known[0][1].keys)} but rank "
                             f"{tensors[0]}'s holds tensors: every rank must pass the same kind of batches")
        if packing is None and known:
            packing = known[0][1]
    elif err is not None:
        raise err
    call = ProbeCall(output, packing)
    for v in out:
        if isinstance(v, _Packed):
            v.call = call
    return call, out


def probing(*models: str, loaders: tuple = ("loader",), reference: str | None = None, keep: bool = False):
    """Decorate an entry point so that it runs on named inputs and picked outputs (the module docstring).

    Args:
        *models: the names of its model arguments (``"model"``; a value that is not a module is left alone).
        loaders: the names of its loader arguments (``None`` values are left alone).
        reference: the name of a reference argument resolved as :func:`lazyhasty.ntk.ntk_alignment` does (the
            model at init, a module or a state_dict; ``None`` for an ``AlphaScaled`` / ``Linearized`` model),
            so that the reference measured runs under the same call.
        keep: the returned object keeps the call (``_probe_call``) for its later methods (`reapplying`).

    The entry point's ``output=`` (an argument, or a key of its ``**options``) is read and passed on as
    ``None``; its ``process_group=``, if any, makes the ranks agree on the packing.

    Example:
        >>> @probing("model")
        ... def first_output(model, loader, output=None):
        ...     return model(next(iter(loader)))
    """
    def decorate(fn):
        sig = inspect.signature(fn)
        var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            a = bound.arguments
            where = a if "output" in sig.parameters else a.get(var_kw, {}) if var_kw else {}
            output = where.get("output")
            group = None
            if "process_group" in sig.parameters and a.get("process_group") is not None:
                group = _dist.resolve(a["process_group"])
            names = [n for n in loaders if a.get(n) is not None]
            call, packed = probe_call([a[n] for n in names], output, group)
            a.update(zip(names, packed))
            if call.active and output is not None:
                where["output"] = None
            if not call.active:
                result = fn(*bound.args, **bound.kwargs)
            else:
                targets = [n for n in models if n in a]
                if reference is not None:
                    a[targets[0]], ref = model_and_reference(a[targets[0]], a.get(reference))
                    a[reference] = as_reference_module(a[targets[0]], ref)
                    targets.append(reference)
                with call.on(*[a[n] for n in targets]) as objs:
                    a.update(zip(targets, objs))
                    result = fn(*bound.args, **bound.kwargs)
            if keep and result is not None:
                result._probe_call = call
            return result
        return wrapper
    return decorate


def reapplying(*models: str):
    """Decorate a method of an object an entry point made with ``keep=True`` (`probing`): its models (argument
    names, or ``"self.attr"``) run under the call the object kept (the packing of its probe set and its
    output)."""
    def decorate(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            call = getattr(self, "_probe_call", None)
            if call is None or not call.active:
                return fn(self, *args, **kwargs)
            bound = sig.bind(self, *args, **kwargs)
            a = bound.arguments
            own = [getattr(self, n[5:]) for n in models if n.startswith("self.")]
            targets = [n for n in models if n in a]
            with call.on(*own, *[a[n] for n in targets]) as objs:
                a.update(zip(targets, objs[len(own):]))
                return fn(*bound.args, **bound.kwargs)
        return wrapper
    return decorate
