"""Models of the NTK benchmarks (the sizes the issue measured its anchors on)."""
import torch
from torch import nn


def mlp_256(depth=3, width=256, d_in=2):
    torch.manual_seed(0)
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 1))


def cnn3(k=10):
    """3 convs + linear on 3x32x32."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * 8 * 8, k))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out
                         else nn.Identity())

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 layout without BatchNorm. stem="cifar": 3x3 conv; stem="imagenet": 7x7/2 conv + maxpool."""

    def __init__(self, width=64, k=10, stem="cifar"):
        super().__init__()
        w = width
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        chans = [w, 2 * w, 4 * w, 8 * w]
        layers, c = [], w
        for i, co in enumerate(chans):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c, co, stride), BasicBlock(co, co, 1)))
            c = co
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, k)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet18_w16(k=10):
    torch.manual_seed(0)
    return ResNet18(16, k, "cifar")


def perturbed_pair(n: int, device, scale: float = 0.1):
    """(init model, perturbed copy, probe batches of 1000) for the MLP 2-256-256-256-1 probe benchmarks."""
    import copy

    m0 = mlp_256().to(device)
    m = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    x = torch.rand(n, 2, device=device) * 2 - 1
    return m0, m, list(x.split(1000))
