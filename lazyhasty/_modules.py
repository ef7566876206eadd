"""Finding modules of a model: its ReLUs (modules, and functional ReLUs during a forward) and the representation
layer. Below both the metrics and the naive spec (:mod:`lazyhasty.reference`), which read the same sites."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def relu_modules(model: nn.Module, modules: Sequence[nn.Module | str] | None = None) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every ``nn.ReLU`` in ``model`` (or of the given modules / names).

    With ``modules=None`` the functional ReLUs of the forward count too (:class:`FunctionalReLUs`), so the
    list may be empty here; a forward in which no ReLU ran is an error later.
    """
    named = list(model.named_modules())
    if modules is None:
        return [(name, m) for name, m in named if isinstance(m, nn.ReLU)]
    if isinstance(modules, (nn.Module, str)):
        modules = [modules]
    if len(modules) == 0:
        raise ValueError("modules= is empty: pass None for all nn.ReLU modules, or a list of modules/names")
    by_id = {id(m): name for name, m in named}
    by_name = dict(named)
    out = []
    for m in modules:
        if isinstance(m, str):
            if m not in by_name:
                raise ValueError(f"model has no submodule named {m!r}")
            out.append((m, by_name[m]))
        elif isinstance(m, nn.Module):
            if id(m) not in by_id:
                raise ValueError(f"module {type(m).__name__} given in modules= is not a submodule of the model")
            out.append((by_id[id(m)], m))
        else:
            raise TypeError(f"modules= entries must be modules or qualified names, got {type(m).__name__}")
    return out


def resolve_layer(model: nn.Module, layer: nn.Module | str | None) -> tuple[str, nn.Module]:
    """The representation layer: ``layer`` (module or qualified name) or the last ``nn.Linear``."""
    named = list(model.named_modules())
    if layer is None:
        linears = [(name, m) for name, m in named if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear: the default representation is the input of the last "
                "nn.Linear; pass layer= (a module or its qualified name)"
            )
        return linears[-1]
    if isinstance(layer, str):
        by_name = dict(named)
        if layer not in by_name:
            raise ValueError(f"model has no submodule named {layer!r}")
        return layer, by_name[layer]
    if isinstance(layer, nn.Module):
        for name, m in named:
            if m is layer:
                return name, m
        raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")
    raise TypeError(f"layer must be a module, a qualified name or None, got {type(layer).__name__}")


# --- functional ReLUs ----------------------------------------------------------------------------------
def _relu_functions() -> dict:
    F = torch.nn.functional
    return {F.relu: "relu", F.relu_: "relu", torch.relu: "relu", torch.relu_: "relu",
            torch.Tensor.relu: "relu", torch.Tensor.relu_: "relu",
            torch.clamp: "clamp", torch.clamp_min: "clamp", torch.Tensor.clamp: "clamp", torch.Tensor.clamp_: "clamp",
            torch.Tensor.clamp_min: "clamp", torch.Tensor.clamp_min_: "clamp"}


def _is_relu_clamp(args, kwargs) -> bool:
    """``clamp(x, min=0)`` / ``clamp_min(x, 0)`` with no upper bound: a ReLU."""
    lo = kwargs.get("min", args[1] if len(args) > 1 else None)
    hi = kwargs.get("max", args[2] if len(args) > 2 else None)
    return hi is None and isinstance(lo, (int, float)) and not isinstance(lo, bool) and lo == 0


class FunctionalReLUs(torch.overrides.TorchFunctionMode):
    """While active, every functional ReLU of ``model`` — ``F.relu``, ``torch.relu``, ``Tensor.relu`` (and the
    in-place forms), ``clamp(min=0)`` / ``clamp_min(0)`` — calls ``fn(site, output)``, like a hooked ``nn.ReLU``.

    A site is named after the innermost module running it and the function, ``"block.conv:relu"`` (``":relu"``
    at the top level), ``#j`` for the j-th extra call at the same place; calls inside ``nn.ReLU`` modules are
    left to those modules' hooks. Sites come in call order, so the same architecture gives the same sites.
    """

    def __init__(self, model: nn.Module, fn: Callable[[str, torch.Tensor], None]):
        super().__init__()
        self.fn = fn
        self.names = {id(m): name for name, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.calls: dict[str, int] = {}
        self.functions = _relu_functions()
        self.handles = []

    def _push(self, module, args):
        self.stack.append(module)

    def _pop(self, module, args, output):
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def new_forward(self) -> None:
        self.calls.clear()
        self.stack.clear()

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self.new_forward()
        self.handles = [register_module_forward_pre_hook(self._push), register_module_forward_hook(self._pop)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = self.functions.get(func)
        if kind is None or (kind == "clamp" and not _is_relu_clamp(args, kwargs)):
            return out
        owner = next((m for m in reversed(self.stack) if id(m) in self.names), None)
        if isinstance(owner, nn.ReLU) or not isinstance(out, torch.Tensor):
            return out  # an nn.ReLU module: its own hook records it
        base = f"{self.names[id(owner)] if owner is not None else ''}:{kind}"
        k = self.calls.get(base, 0)
        self.calls[base] = k + 1
        self.fn(base if k == 0 else f"{base}#{k}", out)
        return out
