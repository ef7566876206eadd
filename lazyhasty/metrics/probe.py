"""Sign similarity and representation alignment from one forward of the model per logging step."""
from __future__ import annotations

import contextlib

from collections.abc import Sequence

import torch
from torch import nn

from .._modes import measuring
from .._probing import probing, reapplying
from .._loaders import model_device, model_inputs, run_model
from ._sites import CallRecorder, resolve_layer, same_modules
from .._precision import exact_fp32
from .alignment import _feature_moments
from .signs import SignPatterns, _BatchWords, _Pass, _reduce


class LinearityProbe:
    """The init model's side of the no-grad linearity probes, captured once on a fixed probe set.

    `capture` keeps the reference's packed ReLU sign patterns and its representation features `[n, d]`;
    `measure(model)` then runs the model once per batch, with both hooks on, and returns
    `{"sign_similarity", "repr_alignment"}` (the same numbers as
    [sign_similarity][lazyhasty.metrics.sign_similarity] and
    [representation_alignment][lazyhasty.metrics.representation_alignment], without rerunning the reference or
    the model twice), and `"ntk_alignment"` when captured with `ntk=` (the reference's kernel is formed once).

    `capture(..., process_group=group)`: each rank passes its own shard of the probe set (possibly empty);
    `measure` returns the values over the union, the same on every rank (see `lazyhasty._dist`).

    Example:
        >>> import copy
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> probe_x = torch.randn(32, 4)
        >>> probe = LinearityProbe.capture(copy.deepcopy(net), probe_x)
        >>> sorted(probe.measure(net))     # every logging step
        ['repr_alignment', 'sign_similarity']
    """

    def __init__(self, x: torch.Tensor, batch_size: int, signs: SignPatterns | None, layer_name: str, where: str,
                 ref_features: list[torch.Tensor], ntk=None, group=None):
        self.x, self.batch_size, self.signs = x, batch_size, signs
        self.layer_name, self.where, self.ref_features = layer_name, where, ref_features
        self.ntk = ntk  # NTKReference or None
        self.group = group  # captured over ranks: measure() is over the union of their shards
        self.dtype = None  # per-batch precision of the representation Gram products (None: fp32 / fp64 features)

    @classmethod
    @torch.no_grad()
    @probing("reference", loaders=("x",), keep=True)  # named inputs (lazyhasty._outputs), kept for measure
    def capture(cls, reference: nn.Module, x: torch.Tensor, *, layer: nn.Module | str | None = None,
                where: str | None = None, modules: Sequence[nn.Module | str] | None = None,
                batch_size: int = 1024, backend: str | None = None, ntk: str | None = None,
                trainable=None, process_group=None, dtype: torch.dtype | None = None,
                ntk_options: dict | None = None) -> "LinearityProbe":
        """Run the reference once over the probe set and keep what the probes compare against.

        The reference runs in eval mode; its modes, buffers and the RNG states are restored after
        (`lazyhasty._modes.measuring`).

        Args:
            reference: the model at init (an `nn.Module`).
            x: the probe inputs `[n, ...]`, a non-empty tensor (a rank's shard may be empty).
            layer: the representation layer (a module of `reference` or its qualified name); default the input
                of the last `nn.Linear`.
            where: `"input"` or `"output"` of `layer` (default `"output"` when `layer` is given).
            modules: only these ReLU modules for the sign similarity.
            batch_size: examples per forward.
            backend: the sign-packing backend.
            ntk: `"trace"` or `"full"` also captures the reference's tangent kernel
                ([NTKReference][lazyhasty.ntk.NTKReference]), and `measure` then adds `"ntk_alignment"`.
            trainable: names of the parameters the kernel is over (default the reference's trainable ones).
            process_group: a `torch.distributed` group (or `"world"`): each rank passes its own shard.
            dtype: the per-batch precision of the representation Gram products (default fp32, fp64 for fp64
                features; sums are float64).
            ntk_options: passed to [NTKReference.capture][lazyhasty.ntk.NTKReference.capture] (`output`,
                `dtype`, `block_size`, ...).

        Returns:
            The captured [LinearityProbe][lazyhasty.metrics.LinearityProbe].

        Raises:
            ValueError: `x` is not a non-empty tensor, or `layer` does not run exactly once per forward.
        """
        with measuring(reference):
            probe = cls._capture(reference, x, layer=layer, where=where, modules=modules, batch_size=batch_size,
                                 backend=backend, ntk=ntk, trainable=trainable, process_group=process_group,
                                 ntk_options=ntk_options)
        probe.dtype = dtype
        return probe

    @classmethod
    def _capture(cls, reference, x, *, layer, where, modules, batch_size, backend, ntk, trainable, process_group,
                 ntk_options) -> "LinearityProbe":
        from .. import _dist

        group = _dist.resolve(process_group)
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or (x.shape[0] == 0 and group is None):
            raise ValueError("the probe set must be a non-empty tensor of inputs [n, ...]")
        batches = [b for b in x.split(batch_size) if b.shape[0]]  # an empty shard (a rank of a group): none
        try:
            signs = SignPatterns.capture(reference, batches, modules=modules, backend=backend, process_group=group)
        except ValueError as exc:
            if "no ReLU ran" not in str(exc):
                raise
            signs = None  # a model without ReLU: only representation alignment is measured
        name, module = resolve_layer(reference, layer)
        where = where or ("input" if layer is None else "output")
        feats: list[torch.Tensor] = []
        rec = CallRecorder([(name, module)], lambda site, t: feats.append(t.detach().reshape(t.shape[0], -1)), where)
        device = model_device(reference)
        try:
            with measuring(reference):
                for xb in batches:
                    n_before = len(feats)
                    rec.new_forward()
                    run_model(reference, model_inputs(xb, reference, device), "the reference")
                    if len(feats) != n_before + 1:
                        raise ValueError(f"layer {name!r} must run exactly once per forward")
        finally:
            rec.remove()
        kernel_ref = None
        if ntk is not None:
            from ..ntk import NTKReference

            kernel_ref = NTKReference.capture(reference, x, kernel=ntk, trainable=trainable, process_group=group,
                                              **(ntk_options or {}))
        return cls(x, batch_size, signs, name, where, feats, kernel_ref, group)

    @torch.no_grad()
    @reapplying("model")
    def measure(self, model: nn.Module, *, backend: str | None = None, centered: bool = False) -> dict:
        """The probes of `model` against the captured reference, measured in eval mode.

        The model's modes, buffers and the RNG states are restored after.

        Args:
            model: the network now, of the reference's architecture.
            backend: the sign-comparison backend.
            centered: centre the representations (linear CKA).

        Returns:
            `{"sign_similarity", "repr_alignment"}` floats (and `"ntk_alignment"`, `"ntk_rel_change"` when
            captured with `ntk=`).
        """
        from .. import _dist

        with _dist.failing_together(self.group, "LinearityProbe.measure"), measuring(model):
            if self.group is not None:
                _dist.check_same_parameters(self.group, "LinearityProbe.measure", model)
            return self._measure(model, backend=backend, centered=centered)

    def _measure(self, model: nn.Module, *, backend: str | None, centered: bool) -> dict:
        device = model_device(model)
        (_, module), = same_modules(model, [self.layer_name])
        got: list[torch.Tensor] = []
        rec = CallRecorder([(self.layer_name, module)], lambda site, t: got.append(t.detach()), self.where)
        run = _Pass(same_modules(model, self.signs.module_names), backend, "model",
                    functional=model if self.signs.functional else None) if self.signs else None
        bits = [b.to(device) for b in self.signs.bits] if self.signs else None
        grams = _feature_moments(centered, self.dtype)
        counts, start = [], 0
        try:
            with measuring(model), exact_fp32():
                for xb, phi0 in zip(self.x.split(self.batch_size), self.ref_features):
                    xb = xb.to(device)
                    b = xb.shape[0]
                    got.clear()
                    rec.new_forward()
                    if run is not None:
                        run.reset(_BatchWords(self.signs.sites, self.signs.units, [w[start:start + b] for w in bits]))
                    with run.observing() if run is not None else contextlib.nullcontext():
                        run_model(model, model_inputs(xb, model))
                    if run is not None:
                        run.check(self.signs.sites)
                        counts.append(run.counts)
                    if len(got) != 1:
                        raise ValueError(f"layer {self.layer_name!r} must run exactly once per forward")
                    phi, phi0 = got[0].reshape(b, -1), phi0.to(device)
                    if phi.dtype != phi0.dtype:  # a float64 reference of a float32 model: the wider dtype
                        wide = torch.promote_types(phi.dtype, phi0.dtype)
                        phi, phi0 = phi.to(wide), phi0.to(wide)
                    grams.add(phi, phi0)
                    start += b
        finally:
            rec.remove()
            if run is not None:
                run.recorder.remove()
        if self.group is not None:
            from .. import _dist
            from .signs import _reduce_over_ranks

            grams.merge_states(_dist.gather_objects(grams.state(), self.group), device)
            out = {"repr_alignment": grams.alignment()}
            if self.signs is not None:
                out["sign_similarity"] = _reduce_over_ranks(counts, sum(self.signs.units), "mean", self.group)
        else:
            out = {"repr_alignment": grams.alignment()}
            if self.signs is not None:
                out["sign_similarity"] = _reduce(torch.cat(counts), sum(self.signs.units), "mean")
        if self.ntk is not None:
            out.update(self.ntk.measure(model))  # ntk_alignment (and ntk_rel_change while K_0 is stored)
        return out
