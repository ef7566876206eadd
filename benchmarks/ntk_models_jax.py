"""The NTK benchmark models as plain JAX functions with the torch models' weights (for neural-tangents).

``jax_model(torch_model) -> (apply_fn, params)`` with ``apply_fn(params, x)`` on NCHW numpy inputs, the
same function as the torch model (convolutions in NHWC, as a JAX user would write them): the kernels of
neural-tangents and lazyhasty can be compared entry by entry.
"""
import jax
import jax.numpy as jnp
import numpy as np
from torch import nn

from ntk_models import BasicBlock, ResNet18


def _np(t):
    return jnp.asarray(t.detach().cpu().numpy())


def _conv(m: nn.Conv2d, params: dict, name: str):
    params[name + ".w"] = _np(m.weight).transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if m.bias is not None:
        params[name + ".b"] = _np(m.bias)
    pad = [(p, p) for p in m.padding]

    def f(p, x):
        y = jax.lax.conv_general_dilated(x, p[name + ".w"], m.stride, pad, rhs_dilation=m.dilation,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=m.groups)
        return y + p[name + ".b"] if name + ".b" in p else y
    return f


def _linear(m: nn.Linear, params: dict, name: str):
    params[name + ".w"] = _np(m.weight).T
    if m.bias is not None:
        params[name + ".b"] = _np(m.bias)

    def f(p, x):
        y = x @ p[name + ".w"]
        return y + p[name + ".b"] if name + ".b" in p else y
    return f


def _sequential(seq: nn.Sequential, params: dict, prefix: str):
    fns = []
    for i, m in enumerate(seq):
        name = f"{prefix}{i}"
        if isinstance(m, nn.Conv2d):
            fns.append(_conv(m, params, name))
        elif isinstance(m, nn.Linear):
            fns.append(_linear(m, params, name))
        elif isinstance(m, nn.ReLU):
            fns.append(lambda p, x: jnp.maximum(x, 0))
        elif isinstance(m, nn.Flatten):  # torch flattens (C, H, W)
            fns.append(lambda p, x: x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1) if x.ndim == 4 else x)
        elif isinstance(m, BasicBlock):
            fns.append(_block(m, params, name))
        elif isinstance(m, nn.Sequential):
            fns.append(_sequential(m, params, name + "."))
        else:
            raise TypeError(f"no JAX twin for {type(m).__name__}")

    def f(p, x):
        for fn in fns:
            x = fn(p, x)
        return x
    return f


def _block(m: BasicBlock, params: dict, name: str):
    c1, c2 = _conv(m.conv1, params, name + ".conv1"), _conv(m.conv2, params, name + ".conv2")
    sc = _conv(m.shortcut, params, name + ".shortcut") if isinstance(m.shortcut, nn.Conv2d) else None

    def f(p, x):
        y = c2(p, jnp.maximum(c1(p, x), 0))
        return jnp.maximum(y + (sc(p, x) if sc is not None else x), 0)
    return f


def jax_model(model: nn.Module):
    """(apply_fn(params, x_nchw), params) computing the same function as ``model``."""
    params: dict = {}
    if isinstance(model, ResNet18):
        if len(model.stem) != 2:
            raise TypeError("only the CIFAR stem has a JAX twin here")
        stem = _sequential(model.stem, params, "stem.")
        layers = [_sequential(getattr(model, f"layer{i}"), params, f"layer{i}.") for i in range(1, 5)]
        fc = _linear(model.fc, params, "fc")

        def body(p, x):
            x = stem(p, x)
            for layer in layers:
                x = layer(p, x)
            return fc(p, x.mean((1, 2)))
    else:
        body = _sequential(model, params, "")

    def apply_fn(p, x):
        return body(p, x.transpose(0, 2, 3, 1) if x.ndim == 4 else x)
    return apply_fn, params


def as_numpy(x):
    return np.asarray(x.detach().cpu().numpy())
