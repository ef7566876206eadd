"""Finding and hooking the modules whose outputs (or inputs) a probe reads."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

# (found in lazyhasty._modules, below the metrics and the naive spec; re-exported here for the metrics)
from .._modules import FunctionalReLUs, relu_modules, resolve_layer, _is_relu_clamp, _relu_functions  # noqa: F401


def same_modules(reference: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The modules of ``reference`` with the given qualified names (a clear error if one is missing)."""
    by_name = dict(reference.named_modules())
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"reference has no submodule named {missing[0]!r}: is it the same architecture as the model?")
    return [(n, by_name[n]) for n in names]


class CallRecorder:
    """Forward hooks calling ``fn(site_name, tensor)`` on each call of each module, in call order.

    A module called several times per forward (e.g. one ``nn.ReLU`` reused in a block) gives one site
    per call, named ``"name"``, ``"name#1"``, ``"name#2"``...
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], fn: Callable[[str, torch.Tensor], None],
                 where: str = "output"):
        if where not in ("output", "input"):
            raise ValueError(f"where must be 'output' or 'input', got {where!r}")
        self.fn = fn
        self.calls: dict[str, int] = {}
        self.handles = []
        for name, m in modules:
            if where == "output":
                self.handles.append(m.register_forward_hook(self._out_hook(name)))
            else:
                self.handles.append(m.register_forward_pre_hook(self._in_hook(name)))

    def _site(self, name: str) -> str:
        k = self.calls.get(name, 0)
        self.calls[name] = k + 1
        return name if k == 0 else f"{name}#{k}"

    def _call(self, name, t):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"module {name!r} produced a {type(t).__name__}, expected a tensor")
        self.fn(self._site(name), t)

    def _out_hook(self, name):
        def hook(module, args, output):
            self._call(name, output)
        return hook

    def _in_hook(self, name):
        def hook(module, args):
            if len(args) == 0:
                raise TypeError(f"module {name!r} was called without a positional input")
            self._call(name, args[0])
        return hook

    def new_forward(self) -> None:
        self.calls.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
