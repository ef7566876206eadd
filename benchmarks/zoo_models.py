"""Models other people wrote, for the "never slower than torch.func" benchmark (benchmarks/bench_zoo.py).

torchvision is a benchmark extra installed next to the pinned CPU torch with ``--no-deps``; its compiled ops do
not load against that torch, and its models do not need them, so :func:`torchvision_models` imports
``torchvision.models`` without running ``torchvision/__init__`` (which registers the compiled ops).
"""
import importlib
import importlib.util
import sys
import types

import torch
from torch import nn


def torchvision_models():
    """``torchvision.models`` (None when torchvision is not installed)."""
    try:
        return importlib.import_module("torchvision.models")
    except ImportError:
        return None
    except RuntimeError:  # torchvision's compiled ops against another torch build: the models do not need them
        pass
    spec = importlib.util.find_spec("torchvision")
    for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[name]
    pkg = types.ModuleType("torchvision")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["torchvision"] = pkg
    return importlib.import_module("torchvision.models")


def plain_cnn():
    """The issue's plain CNN: 3 convolutions, global average pool, linear; 3x32x32 inputs, 10 outputs."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


class TextClassifier(nn.Module):
    """nn.TransformerEncoder over token embeddings, mean-pooled, linear head (5 classes)."""

    def __init__(self, vocab=100, d=32, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True), layers)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


class Attention(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.inp, self.att, self.head = nn.Linear(8, d), nn.MultiheadAttention(d, 4, batch_first=True), nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.att(h, h, h, need_weights=False)[0].mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.rnn, self.head = cell(8, 32, batch_first=True), nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class CosineLinear(nn.Linear):
    """A Linear with normalised rows, computed in its forward (the issue's W(theta) subclass)."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)


def cosine_mlp():
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), CosineLinear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cases():
    """name -> (model factory, input factory, n); n small enough that torch.func's J fits in a few GB."""
    tv = torchvision_models()
    out = {
        "plain-cnn": (plain_cnn, lambda n: torch.randn(n, 3, 32, 32), 64),
        "transformer-text": (TextClassifier, lambda n: torch.randint(0, 100, (n, 12)), 32),
        "multihead-attention": (Attention, lambda n: torch.randn(n, 10, 8), 64),
        "lstm": (Recurrent, lambda n: torch.randn(n, 10, 8), 64),
        "gru": (lambda: Recurrent(nn.GRU), lambda n: torch.randn(n, 10, 8), 64),
        "cosine-mlp": (cosine_mlp, lambda n: torch.randn(n, 32), 64),
    }
    if tv is not None:
        img = lambda n: torch.randn(n, 3, 32, 32)  # noqa: E731
        out.update({
            "tv-resnet18": (lambda: tv.resnet18(num_classes=10), img, 2),
            "tv-mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10), img, 8),
            "tv-squeezenet1_1": (lambda: tv.squeezenet1_1(num_classes=10), img, 8),
            "tv-vit-tiny": (lambda: tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                         hidden_dim=32, mlp_dim=64, num_classes=10), img, 32),
        })
    return out
