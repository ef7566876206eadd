"""Small models shared by the tests."""
import torch
from torch import nn


def mlp(widths=(2, 31, 1007, 1), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Conv + linear ReLUs; one ReLU module reused twice (as torchvision's BasicBlock does)."""

    def __init__(self, channels=5, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(channels * 4, 7)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(7, classes)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.pool(x).flatten(1)
        return self.fc2(self.act(self.fc1(x)))


def perturbed(model: nn.Module, scale=0.3, seed=1) -> nn.Module:
    import copy

    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def batches(x: torch.Tensor, size: int, form: str = "tensor"):
    out = []
    for chunk in x.split(size):
        if form == "tensor":
            out.append(chunk)
        elif form == "tuple":
            out.append((chunk, None))
        elif form == "dict":
            out.append({"x": chunk, "y": torch.zeros(len(chunk))})
    return out


class MixesAbove(nn.Module):
    """A Linear whose output subtracts the batch mean only in batches of more than ``size`` examples (a model
    mixing examples only in large batches: a smaller sample does not see it)."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.size = size
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        return y - y.mean(0) if x.shape[0] > self.size else y
