"""The reference's side of the NTK alignment, captured once (the every-logging-step path).

At every log a run compares the model's kernel with the kernel at init, which never changes. Capturing
it once halves the NTK part of a probe round: ``NTKReference.capture(f0, probe)`` keeps ``K_0`` (float32
storage for float32 models; sums are float64, exact: :class:`lazyhasty.metrics._exact.AlignmentSums`)
while it fits ``max_bytes``; ``.alignment(model)`` then forms only the model's kernel. Beyond the budget
it keeps a frozen copy of the reference and recomputes both kernels tile by tile
(:func:`lazyhasty.ntk.ntk_alignment`): the same number, without the saving.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .._loaders import all_inputs, model_device
from ..metrics._exact import AlignmentSums
from ._engine import KERNELS, ntk_alignment, ntk_gram
from ._layers import select_output

DEFAULT_REFERENCE_BYTES = 1 << 30


class NTKReference:
    """``K_0`` of a reference model on a fixed probe set, for ``KA(K_t, K_0)`` at every logging step.

    capture(reference, loader, kernel="trace"|"full", centered=False, ...) -> NTKReference
    alignment(model) -> float   equal to ``ntk_alignment(model, loader, reference, ...)`` (1e-6 float32,
                                1e-12 float64): the same tiles, the same exact sums.

        >>> ref = NTKReference.capture(model_at_init, probe_x, kernel="trace")
        >>> ref.alignment(model)      # every log: only the model's kernel is formed

    ``stored``: whether ``K_0`` is kept (``[n, n]`` / ``[n, k, n, k]``), else the alignment recomputes it;
    ``nbytes``: the memory it holds.
    """

    def __init__(self, x: torch.Tensor, kernel: str, centered: bool, options: dict, K0: torch.Tensor | None,
                 reference: nn.Module | None, trainable: frozenset):
        self.x, self.kernel, self.centered, self.options = x, kernel, centered, options
        self.K0, self.reference, self.trainable = K0, reference, trainable

    @property
    def stored(self) -> bool:
        return self.K0 is not None

    @property
    def nbytes(self) -> int:
        return 0 if self.K0 is None else self.K0.numel() * self.K0.element_size()

    @classmethod
    def capture(cls, reference: nn.Module, loader, *, kernel: str = "trace", centered: bool = False,
                implementation: str = "auto", dtype: torch.dtype | None = None, block_size: int | None = None,
                max_bytes: int = DEFAULT_REFERENCE_BYTES, backend: str | None = None, output=None,
                trainable=None) -> "NTKReference":
        """Form ``K_0`` once (or, beyond ``max_bytes``, keep a frozen copy of ``reference``).

        trainable: names of the parameters the kernel is over (default: the reference's trainable ones;
        the Trainer passes the model's, as :func:`ntk_alignment` does with a frozen ``f_0``).
        """
        if kernel not in KERNELS or kernel == "diagonal":
            raise ValueError(f"kernel must be 'trace' or 'full' for a reference kernel, got {kernel!r}")
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        x = all_inputs(loader, model_device(reference))
        names = frozenset(trainable) if trainable is not None else frozenset(
            n for n, p in reference.named_parameters() if p.requires_grad)
        options = dict(implementation=implementation, dtype=dtype, block_size=block_size, backend=backend,
                       output=output)
        n = x.shape[0]
        with torch.no_grad():
            k = int(select_output(reference, output)(x[:1]).reshape(1, -1).shape[1])
        item = torch.finfo(dtype or next(p.dtype for p in reference.parameters())).bits // 8
        need = item * (n * n if kernel == "trace" else (n * k) ** 2)
        frozen = copy.deepcopy(reference)
        for name, p in frozen.named_parameters():
            p.requires_grad_(name in names)
        if need > max_bytes:
            return cls(x, kernel, centered, options, None, frozen, names)
        K0 = ntk_gram(frozen, x, kernel=kernel, **options)
        return cls(x, kernel, centered, options, K0, None, names)

    def alignment(self, model: nn.Module) -> float:
        """``KA(K_model, K_0)`` (centred if captured so) on the captured probe set."""
        return self.measure(model)["ntk_alignment"]

    def measure(self, model: nn.Module) -> dict:
        """``{"ntk_alignment": KA(K_t, K_0), "ntk_rel_change": |K_t - K_0|_F / |K_0|_F}`` (the second only
        while ``K_0`` is stored; from the same exact sums: ``|K_t|^2 + |K_0|^2 - 2 <K_t, K_0>``)."""
        if self.K0 is None:
            return {"ntk_alignment": ntk_alignment(model, self.x, self.reference, kernel=self.kernel,
                                                   centered=self.centered, **self.options)}
        have = {n for n, p in model.named_parameters() if p.requires_grad}
        if have != set(self.trainable):
            raise ValueError("the model's trainable parameters differ from those the reference kernel was captured "
                             f"over: {sorted(have ^ set(self.trainable))[:5]}")
        Kt = ntk_gram(model, self.x.to(model_device(model)), kernel=self.kernel, **self.options)
        n = self.x.shape[0]
        sums = AlignmentSums(n, Kt.shape[1] if self.kernel == "full" else 1, self.kernel, self.centered, Kt.device)
        sums.add(Kt, self.K0.to(Kt.device), slice(0, n), slice(0, n), False)
        change = (sums.sq_t + sums.sq_0 + sums.cross.scale(-2.0)).value()
        return {"ntk_alignment": sums.alignment(),
                "ntk_rel_change": max(change, 0.0) ** 0.5 / max(sums.sq_0.value(), 1e-300) ** 0.5}
