"""The training losses lazyhasty's trainer and Monitor share: per-example values and correctness.

``LOSSES`` names them: ``cross_entropy`` (logits ``[b, C]``, class labels), ``logistic`` (one score per
example, labels in {-1, +1} or {0, 1}) and ``mse`` (outputs and targets of one shape; class labels are
one-hot encoded for ``[b, C]`` outputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("cross_entropy", "logistic", "mse")


def per_example_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[b]`` losses. cross_entropy: logits ``[b, C]``, labels long. logistic: ``[b]``/``[b, 1]`` score,
    labels in {-1, +1} or {0, 1}. mse: outputs and targets of the same shape (labels are one-hot
    encoded when ``out`` is ``[b, C]`` and ``y`` holds class indices)."""
    if kind == "cross_entropy":
        return F.cross_entropy(out, y.long(), reduction="none")
    if kind == "logistic":
        s = out.reshape(out.shape[0], -1)
        if s.shape[1] != 1:
            raise ValueError(f"logistic loss needs one output per example, got {tuple(out.shape)}")
        s = s[:, 0]
        yy = y.to(s.dtype)
        yy = torch.where(yy > 0, 1.0, -1.0) if bool(((yy == 0) | (yy == 1)).all()) else yy
        return F.softplus(-yy * s)
    target = y.to(out.dtype)
    if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point() and out.shape[1] > 1:
        target = F.one_hot(y.long(), out.shape[1]).to(out.dtype)
    return ((out - target.reshape(out.shape)) ** 2).reshape(out.shape[0], -1).sum(1) / 2


def predictions_correct(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() == 2 and out.shape[1] > 1:
        return out.argmax(1) == y.long()
    s = out.reshape(-1)
    yy = y.to(s.dtype)
    if bool(((yy == 0) | (yy == 1)).all()):
        yy = yy * 2 - 1
    return torch.sign(s) == torch.sign(yy)
