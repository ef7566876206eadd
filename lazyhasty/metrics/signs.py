"""ReLU sign similarity: the fraction of (example, unit) pairs whose on/off status is unchanged since init.

The hot path packs each ReLU site's signs into 32-bit words and compares them by XOR + popcount
(`lazyhasty.ops.signs`: [pack_signs][lazyhasty.ops.pack_signs], [sign_mismatch][lazyhasty.ops.sign_mismatch]),
so a probe set costs `n * units / 8` bytes, not `n * units` booleans, and the stateful
[SignPatterns][lazyhasty.metrics.SignPatterns] keeps the init model's words so it is not rerun at every log.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .._modes import measuring
from .._probing import probing
from .._loaders import (as_reference_module, check_materialized, iter_inputs, model_and_reference, model_device,
                        model_inputs, run_model)
from ..ops.signs import pack_signs, sign_mismatch
import contextlib
import zlib

from ._sites import CallRecorder, FunctionalReLUs, relu_modules, same_modules


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() != 2 else t


class _Pass:
    """One forward of a model with hooks on its sign sites; either packs or compares against given words."""

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], backend: str | None, role: str,
                 functional: nn.Module | None = None):
        self.relu = {name: isinstance(m, nn.ReLU) for name, m in modules}
        self.backend = backend
        self.role = role
        self.recorder = CallRecorder(modules, self._on_call)
        # functional F.relu / torch.relu / clamp(min=0) calls of this model, observed during its forward
        self.functional = FunctionalReLUs(functional, self._on_call) if functional is not None else None
        self.reset(None)
        self.active = False

    def observing(self):
        """Context of one forward: functional ReLUs are recorded too (when asked for)."""
        return self.functional if self.functional is not None else contextlib.nullcontext()

    @property
    def functional_sites(self) -> bool:
        return any(":" in s.split("#")[0] for s in self.sites)

    def reset(self, against: "_BatchWords | None") -> None:
        self.recorder.new_forward()
        self.active = True
        self.against = against
        self.sites: list[str] = []
        self.units: list[int] = []
        self.bits: list[torch.Tensor] = []
        self.nan_flags: list[torch.Tensor] = []
        self.counts: torch.Tensor | None = None

    def _on_call(self, site: str, t: torch.Tensor) -> None:
        if not self.active:  # the model and the reference may share modules (even be one object)
            return
        if t.dim() == 0:
            raise ValueError(f"module {site!r} returned a 0-d tensor: sign patterns need a batch dimension")
        x = _flat(t.detach())
        base = site.split("#")[0]
        # ReLU outputs are >= 0 or NaN, so their sum is NaN exactly when one is NaN: one cheap reduction.
        relu = self.relu.get(base, ":" in base)  # "owner:relu" sites are functional ReLUs
        self.nan_flags.append(x.sum(dtype=torch.float32).isnan() if relu else x.isnan().any())
        k = len(self.sites)
        self.sites.append(site)
        self.units.append(x.shape[1])
        if self.against is None:
            self.bits.append(pack_signs(x, backend=self.backend))
            return
        ref = self.against
        if k >= len(ref.sites) or ref.sites[k] != site or ref.units[k] != x.shape[1]:
            theirs = f"{ref.sites[k]!r} with {ref.units[k]} units" if k < len(ref.sites) else "nothing"
            raise ValueError(
                f"sign site {k} is {site!r} with {x.shape[1]} units in the model but {theirs} in the reference: "
                "the model and the reference must be the same architecture"
            )
        c = sign_mismatch(x, ref.bits[k], backend=self.backend)
        self.counts = c if self.counts is None else self.counts + c

    def check(self, other_sites: list[str] | None = None) -> None:
        self.active = False
        if not self.sites:
            raise ValueError("no ReLU ran during the forward pass (no nn.ReLU module, no F.relu / torch.relu / "
                             "clamp(min=0) call, or none of the modules= given): sign similarity has nothing to "
                             "compare")
        if self.nan_flags and bool(torch.stack(self.nan_flags).any()):
            bad = next(s for s, f in zip(self.sites, self.nan_flags) if bool(f))
            raise ValueError(f"NaN in the activations of {bad!r} ({self.role}): sign similarity is undefined")
        if other_sites is not None and len(other_sites) != len(self.sites):
            raise ValueError(
                f"the {self.role} ran {len(self.sites)} sign sites but the reference ran {len(other_sites)}: "
                "not the same architecture"
            )


class _BatchWords:
    def __init__(self, sites, units, bits):
        self.sites, self.units, self.bits = sites, units, bits


_HASH_WEIGHTS: dict = {}


def _hash_weights(n: int, device) -> torch.Tensor:
    """Two fixed odd int64 weights per input word (odd: invertible mod 2**64, so any change of a single word
    changes the hash)."""
    key = (n, str(device))
    w = _HASH_WEIGHTS.get(key)
    if w is None:
        g = torch.Generator().manual_seed(0x5EED)
        w = (torch.randint(-2**62, 2**62, (2, n), generator=g, dtype=torch.int64) | 1).to(device)
        _HASH_WEIGHTS.clear()  # one probe shape at a time in practice: keep the cache small
        _HASH_WEIGHTS[key] = w
    return w


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """``[b, 2]`` int64 hashes of each example's bits (its dtype, shape and every value, in order): two
    position-weighted sums of the input words mod 2**64, one of them over bit-mixed words. A flipped, permuted
    or otherwise changed example changes them (one changed word: always; more: all but ~2**-64 of the time)."""
    b = x.shape[0]
    flat = x.detach().reshape(b, -1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(b, -1)
    size = flat.element_size()
    word = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[size]
    words = flat.contiguous().view(word).to(torch.int64) if flat.dtype != torch.bool else flat.to(torch.int64)
    mixed = words ^ (words >> 13) ^ (words << 7)
    w = _hash_weights(words.shape[1], words.device)
    tag = zlib.crc32(repr((str(x.dtype), tuple(x.shape[1:]))).encode())  # the same in every process
    return torch.stack([(words * w[0]).sum(1) + tag, (mixed * w[1]).sum(1)], 1).cpu()


class SignPatterns:
    """Packed ReLU sign patterns of a reference model (the model at init) on a fixed probe set.

    Capture once, compare at every logging step without rerunning the reference. The probe loader must yield
    the same examples in the same order each time: a hash of every example's bits (dtype, shape, each value in
    order) is stored and checked, so a flipped, permuted or otherwise changed input is an error naming the
    example.

    `capture(..., process_group=group)`: each rank captures its own shard of the probe set (possibly empty)
    and keeps its words; `similarity` then returns the value over the union, the same on every rank
    (`reduction="none"`: the rank's own examples). See `lazyhasty._dist`.

    Attributes:
        sites: the sign sites, each a module name (with `#j` for the j-th extra call of a module called
            several times; `"owner:relu"` for a functional ReLU).
        units: the number of units of each site.
        bits: `bits[k]` is `[n, ceil(units[k] / 32)]` int32, the packed signs of site `sites[k]`.
        fingerprints: `[n, 2]` int64 hashes of the probe examples.

    Example:
        >>> init = SignPatterns.capture(model_at_init, probe_loader)   # n * units / 8 bytes
        >>> init.similarity(model, probe_loader)                       # float in [0, 1]
    """

    def __init__(self, module_names: list[str], sites: list[str], units: list[int], bits: list[torch.Tensor],
                 fingerprints: torch.Tensor, functional: bool = False, group=None):
        self.functional = functional  # sites include functional ReLUs ("owner:relu")
        self.group = group  # captured over ranks: similarity() is over the union of their shards
        self.module_names = module_names
        self.sites = sites
        self.units = units
        self.bits = bits
        self.fingerprints = fingerprints

    @property
    def n(self) -> int:
        return self.fingerprints.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bits)

    @classmethod
    @torch.no_grad()
    @probing("reference", keep=True)  # named inputs (lazyhasty._outputs)
    def capture(cls, reference: nn.Module, loader, *, modules: Sequence[nn.Module | str] | None = None,
                backend: str | None = None, process_group=None) -> "SignPatterns":
        """Run `reference` (eval mode) over `loader` and keep its packed sign patterns.

        Args:
            reference: the model at init (an `nn.Module`; a state dict has no forward pass).
            loader: the probe examples: a tensor `[n, ...]` or an iterable of batches, the same each time.
            modules: only these ReLU modules (modules of `reference` or qualified names); default every
                `nn.ReLU` and functional ReLU call.
            backend: the sign-packing backend (default: chosen by `lazyhasty._backend.select`).
            process_group: a `torch.distributed` group (or `"world"`): each rank captures its own shard.

        Returns:
            The captured [SignPatterns][lazyhasty.metrics.SignPatterns].

        Raises:
            TypeError: `reference` is not an `nn.Module`.
            ValueError: the sign sites changed between batches.
        """
        from .. import _dist

        group = _dist.resolve(process_group)
        if not isinstance(reference, nn.Module):
            hint = (": a state_dict has no forward pass; load it into a module of the same architecture "
                    "(ref = copy.deepcopy(model); ref.load_state_dict(state_dict)) and capture that"
                    ) if isinstance(reference, Mapping) else ""
            raise TypeError(f"SignPatterns.capture needs the reference model (an nn.Module), got "
                            f"{type(reference).__name__}{hint}")
        check_materialized(reference, "reference")
        named = relu_modules(reference, modules)
        if group is not None:
            _dist.agree(group, "SignPatterns.capture", reference=_dist.structure(reference),
                        modules=None if modules is None else [n for n, _ in named])
            _dist.check_same_parameters(group, "SignPatterns.capture", reference)
        device = model_device(reference)
        run = _Pass(named, backend, "reference", functional=reference if modules is None else None)
        sites, units, chunks, prints = None, None, [], []
        failed = None
        try:
            with measuring(reference):
                for x in iter_inputs(loader, device, allow_empty=group is not None, same_shape=True):
                    run.reset(None)
                    with run.observing():
                        run_model(reference, model_inputs(x, reference), "the reference")
                    run.check(sites)
                    if sites is None and not run.functional_sites:
                        run.functional = None  # no functional ReLU in this architecture: no mode overhead
                    if sites is None:
                        sites, units = list(run.sites), list(run.units)
                    elif run.sites != sites or run.units != units:
                        raise ValueError("the sign sites changed between batches (inputs of different sizes?)")
                    chunks.append(run.bits)
                    prints.append(_fingerprint(x))
        except Exception as exc:  # noqa: BLE001 - with a group, every rank learns of it (below)
            if group is None:
                raise
            failed = exc
        finally:
            run.recorder.remove()
        if group is not None:
            _dist.settle(group, failed, "SignPatterns.capture")
            sites, units = _agreed_sites(_dist.gather_objects(None if sites is None else (sites, units), group))
        if not chunks:  # this rank's shard is empty
            bits = [torch.zeros(0, (u + 31) // 32, dtype=torch.int32, device=device) for u in units]
            return cls([n for n, _ in named], sites, units, bits, torch.zeros(0, 2, dtype=torch.int64),
                       functional=any(":" in s.split("#")[0] for s in sites), group=group)
        bits = [torch.cat([c[k] for c in chunks]) for k in range(len(sites))]
        return cls([n for n, _ in named], sites, units, bits, torch.cat(prints),
                   functional=any(":" in s.split("#")[0] for s in sites), group=group)

    def to(self, device) -> "SignPatterns":
        return SignPatterns(self.module_names, self.sites, self.units, [b.to(device) for b in self.bits],
                            self.fingerprints, self.functional, self.group)

    @torch.no_grad()
    @probing("model")  # named inputs (lazyhasty._outputs)
    def similarity(self, model: nn.Module, loader, *, reduction: str = "mean", backend: str | None = None):
        """Sign similarity of `model` with the captured reference on the same probe set.

        Args:
            model: the network now, of the reference's architecture.
            loader: the same probe examples, in the same order, as at capture.
            reduction: `"mean"`: a float, matching units over all `n * sum(units)` pairs; `"none"`: `[n]`
                float64, the per-example fraction of matching units.
            backend: the sign-comparison backend (default: chosen by `lazyhasty._backend.select`).

        Returns:
            A float in `[0, 1]`, or an `[n]` tensor for `reduction="none"`.

        Raises:
            ValueError: `reduction` is neither value, or the probe examples differ from the captured ones.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        from .. import _dist

        group = self.group
        if group is not None:
            _dist.agree(group, "SignPatterns.similarity", model=_dist.structure(model), reduction=reduction)
            _dist.check_same_parameters(group, "SignPatterns.similarity", model)
        named = same_modules(model, self.module_names)
        device = model_device(model)
        bits = [b.to(device) for b in self.bits]
        run = _Pass(named, backend, "model", functional=model if self.functional else None)
        counts, start = [], 0
        failed = None
        try:
            with measuring(model):
                for x in iter_inputs(loader, device, allow_empty=group is not None, same_shape=True):
                    b = x.shape[0]
                    if start + b > self.n:
                        raise ValueError(f"the loader yields more than the {self.n} examples captured")
                    same = (_fingerprint(x) == self.fingerprints[start:start + b]).all(1)
                    if not bool(same.all()):
                        first = start + int((~same).nonzero()[0])
                        raise ValueError(
                            f"example {first} (of {start}..{start + b - 1}) differs from the captured probe set: the "
                            "loader must yield the same examples, bit for bit, in the same order (no shuffling, no "
                            "random augmentation)"
                        )
                    run.reset(_BatchWords(self.sites, self.units, [w[start:start + b] for w in bits]))
                    with run.observing():
                        run_model(model, model_inputs(x, model))
                    run.check(self.sites)
                    counts.append(run.counts)
                    start += b
            if start != self.n:
                raise ValueError(f"the loader yielded {start} examples but {self.n} were captured")
        except Exception as exc:  # noqa: BLE001 - with a group, every rank learns of it (below)
            if group is None:
                raise
            failed = exc
        finally:
            run.recorder.remove()
        if group is None:
            return _reduce(torch.cat(counts), sum(self.units), reduction)
        _dist.settle(group, failed, "SignPatterns.similarity")
        return _reduce_over_ranks(counts, sum(self.units), reduction, group)


def _reduce(mismatches: torch.Tensor, units_per_example: int, reduction: str):
    if reduction == "none":
        return 1.0 - mismatches.double().cpu() / units_per_example
    total = mismatches.sum().item()
    return 1.0 - total / (mismatches.shape[0] * units_per_example)


@torch.no_grad()
@probing("model", reference="reference")  # named inputs (lazyhasty._outputs)
def sign_similarity(model: nn.Module, loader, reference=None, *, modules: Sequence[nn.Module | str] | None = None,
                    reduction: str = "mean", backend: str | None = None, process_group=None):
    """Fraction of (example, ReLU unit) pairs whose on/off status (output > 0) is the same in both models.

    `1 - sum_i sum_u [sign(h_u(x_i)) != sign(h0_u(x_i))] / (n U)`, where `sign` means `> 0`, pooled over all
    units of all ReLUs of `model`: `nn.ReLU` modules and functional `F.relu` / `torch.relu` / `Tensor.relu` /
    `clamp(min=0)` calls (sites `"owner:relu"`). Both models run in eval mode under `torch.no_grad` on each
    batch, so any loader works, shuffled or not.

    Args:
        model: the network now.
        loader: the probe examples: a tensor `[n, ...]` or an iterable of batches.
        reference: the model at init: a module of the same architecture or its state dict; `None` for an
            [AlphaScaled][lazyhasty.regimes.AlphaScaled] / [Linearized][lazyhasty.regimes.Linearized] model.
        modules: only these ReLU modules (modules of `model` or qualified names).
        reduction: `"mean"` (a float) or `"none"` (`[n]` per-example similarities).
        backend: the sign-packing backend (default: chosen by `lazyhasty._backend.select`).
        process_group: a `torch.distributed` group (or `"world"`): each rank passes its own shard of the probe
            set (possibly empty) and gets the similarity over the union, the same on every rank (mismatch
            counts are summed); `reduction="none"` then gives the rank's own examples. See `lazyhasty._dist`.

    Returns:
        A float in `[0, 1]` (1.0 at init, lower as ReLUs flip), or `[n]` float64 for `reduction="none"`.

    Raises:
        ValueError: `reduction` is neither value, or the model has no ReLU.

    Example:
        >>> import copy
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(32, 4)
        >>> sign_similarity(net, x, copy.deepcopy(net).state_dict())   # 1.0 at init
        1.0
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    from .. import _dist

    group = _dist.resolve(process_group)
    model, reference = model_and_reference(model, reference)  # None: an AlphaScaled/Linearized's init
    ref = as_reference_module(model, reference)
    check_materialized(model, "model")
    check_materialized(ref, "reference")
    named = relu_modules(model, modules)
    names = [n for n, _ in named]
    if group is not None:
        _dist.agree(group, "sign_similarity", model=_dist.structure(model), reference=_dist.structure(ref),
                    modules=None if modules is None else names, reduction=reduction)
        _dist.check_same_parameters(group, "sign_similarity", model, ref)
    ref_named = same_modules(ref, names)
    device, ref_device = model_device(model), model_device(ref)
    ref_run = _Pass(ref_named, backend, "reference", functional=ref if modules is None else None)
    run = _Pass(named, backend, "model", functional=model if modules is None else None)
    counts, units, failed = [], None, None
    try:
        with measuring(model, ref):
            for x in iter_inputs(loader, device, allow_empty=group is not None, same_shape=True):
                ref_run.reset(None)
                with ref_run.observing():
                    run_model(ref, model_inputs(x, ref, ref_device), "the reference")
                ref_run.check()
                if units is None and not ref_run.functional_sites:
                    ref_run.functional = run.functional = None  # none in this architecture: no mode overhead
                words = _BatchWords(ref_run.sites, ref_run.units, [w.to(device) for w in ref_run.bits])
                run.reset(words)
                with run.observing():
                    run_model(model, model_inputs(x, model))
                run.check(ref_run.sites)
                if units is not None and sum(run.units) != units:
                    raise ValueError("the number of ReLU units changed between batches (inputs of different sizes?)")
                units = sum(run.units)
                counts.append(run.counts)
    except Exception as exc:  # noqa: BLE001 - with a group, every rank learns of it (below)
        if group is None:
            raise
        failed = exc
    finally:
        ref_run.recorder.remove()
        run.recorder.remove()
    if group is None:
        return _reduce(torch.cat(counts), units, reduction)
    _dist.settle(group, failed, "sign_similarity")
    return _reduce_over_ranks(counts, units, reduction, group)


def _reduce_over_ranks(counts: list, units: int | None, reduction: str, group):
    """Mismatch counts of every rank's shard summed (``"mean"``, the same on every rank), or this rank's
    own per-example similarities (``"none"``)."""
    from .. import _dist

    mism = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int64)
    local = torch.tensor([int(mism.sum()), mism.shape[0] * (units or 0)], dtype=torch.int64)
    total = _dist.sum_i64(local, group)
    if int(total[1]) == 0:
        raise ValueError("the probe set is empty on every rank")
    if reduction == "none":
        return _reduce(mism, units, "none") if counts else torch.zeros(0, dtype=torch.float64)
    return 1.0 - int(total[0]) / int(total[1])


def _agreed_sites(everyone: list) -> tuple[list, list]:
    """The sign sites and units every rank with examples saw (an error if they differ, or if none has any)."""
    seen = [(r, v) for r, v in enumerate(everyone) if v is not None]
    if not seen:
        raise ValueError("the probe set is empty on every rank")
    for r, v in seen[1:]:
        if v != seen[0][1]:
            raise ValueError(f"rank {r} ran other sign sites than rank {seen[0][0]}: inputs of different shapes?")
    return list(seen[0][1][0]), list(seen[0][1][1])
