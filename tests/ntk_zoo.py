"""Architectures the NTK engine is checked on (each returns model, inputs)."""
import torch
import torch.nn.functional as F
from torch import nn


def mlp_paper(n=7):
    """The paper's 4-layer ReLU MLP on 2-D inputs, output [b]."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                                     nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 1))

        def forward(self, x):
            return self.net(x).squeeze(1)
    return M(), torch.rand(n, 2) * 2 - 1


def cnn_strided(n=5):
    """Stride, padding, dilation, groups; no biases; output [b, 3]."""
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False), nn.ReLU(),
        nn.Conv2d(6, 6, 1, groups=3, bias=False), nn.Tanh(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 3, bias=False))
    return m, torch.randn(n, 2, 7, 7)


class _Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.relu = nn.ReLU()
        self.short = nn.Conv2d(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + self.short(x))


def resnet_small(n=4):
    """Residual blocks without BatchNorm, a reused ReLU, global pooling, output [b, 4]."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), _Block(4, 4, 1), _Block(4, 8, 2),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return m, torch.randn(n, 3, 8, 8)


def layernorm_seq(n=5):
    """Linear over [b, T, d] (positions summed) with LayerNorm, output [b, 2]."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.ln = nn.LayerNorm(8)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.ln(self.inp(x)))
            return self.head(torch.tanh(self.mix(h)).mean(1))
    return M(), torch.randn(n, 6, 3)


def shared_linear(n=6):
    """One Linear called twice per forward (shared weights), output [b, 2]."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 9)
            self.shared = nn.Linear(9, 9)
            self.out = nn.Linear(9, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = torch.tanh(self.shared(h))
            h = torch.relu(self.shared(h))
            return self.out(h)
    return M(), torch.randn(n, 4)


def embedding_bag(n=6):
    """Embedding (with padding_idx) over a token sequence, mean-pooled, output [b, 3]."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 5, padding_idx=0)
            self.fc = nn.Linear(5, 3)

        def forward(self, idx):
            return self.fc(torch.tanh(self.emb(idx)).mean(1))
    g = torch.Generator().manual_seed(3)
    return M(), torch.randint(0, 11, (n, 7), generator=g)


def batchnorm_eval(n=5):
    """BatchNorm2d and BatchNorm1d in eval mode with non-trivial running stats, output [b, 3]."""
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.eval(), torch.randn(n, 1, 6, 6)


def conv1d_groupnorm(n=4):
    """Conv1d with 'same' and reflect padding, GroupNorm, output [b, 2]."""
    m = nn.Sequential(nn.Conv1d(2, 6, 4, padding="same"), nn.GroupNorm(3, 6), nn.ReLU(),
                      nn.Conv1d(6, 4, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
                      nn.Flatten(), nn.Linear(4 * 5, 2))
    return m, torch.randn(n, 2, 9)


def generic_params(n=5):
    """Parameters the layerwise path does not know (PReLU, a free scale) plus a frozen layer."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(3, 7)
            self.frozen.requires_grad_(False)
            self.act = nn.PReLU(7)
            self.fc = nn.Linear(7, 2)
            self.scale = nn.Parameter(torch.tensor(1.3))

        def forward(self, x):
            return self.scale * self.fc(self.act(self.frozen(x)))
    return M(), torch.randn(n, 3)


def tied_and_outside_use(n=5):
    """An Embedding tied to the output Linear, and a Linear weight also used outside its forward."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 6)
            self.proj = nn.Linear(6, 6)
            self.dec = nn.Linear(6, 9, bias=False)
            self.dec.weight = self.emb.weight

        def forward(self, idx):
            h = torch.tanh(self.proj(self.emb(idx).mean(1)))
            h = h + 0.5 * F.linear(h, self.proj.weight)  # proj.weight used outside proj's forward
            return self.dec(h)
    g = torch.Generator().manual_seed(5)
    return M(), torch.randint(0, 9, (n, 4), generator=g)


class _InplaceBlock(nn.Module):
    """torchvision's BasicBlock: in-place ReLUs and ``out += identity`` overwrite captured layer outputs."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet_inplace(n=5):
    """torchvision-style: a conv straight into ReLU(inplace=True), BatchNorm (eval, random running stats),
    an in-place residual block, a Hardswish(inplace=True) after a linear layer; output [b, 3]."""
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), _InplaceBlock(4),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.Hardswish(inplace=True),
                      nn.Linear(6, 3))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.5, 0.5)
    return m.eval(), torch.randn(n, 2, 6, 6)


def attention(n=5):
    """nn.MultiheadAttention: its in_proj_weight reaches no module hook and out_proj is a Linear subclass
    whose forward never runs; captured through the unrolled attention; output [b, 3]."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.head(self.att(h, h, h, need_weights=False)[0].mean(1))
    return M().eval(), torch.randn(n, 3, 4)


def vit_tiny(n=5):
    """A ViT in miniature: patch conv, class token (expand + cat), positional embedding (add), an
    nn.TransformerEncoder (batch first, as torchvision's ViT), a per-channel scale; output [b, 3]."""
    class M(nn.Module):
        def __init__(self, E=8):
            super().__init__()
            self.patch = nn.Conv2d(2, E, 2, stride=2)
            self.cls = nn.Parameter(0.1 * torch.randn(1, 1, E))
            self.pos = nn.Parameter(0.1 * torch.randn(1, 5, E))
            layer = nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.scale = nn.Parameter(1 + 0.1 * torch.randn(E))
            self.head = nn.Linear(E, 3)

        def forward(self, x):
            h = self.patch(x).flatten(2).transpose(1, 2)
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
            h = self.enc(h)
            return self.head(h[:, 0] * self.scale)
    return M().eval(), torch.randn(n, 2, 4, 4)


def subclasses(n=5):
    """A Linear subclass that keeps Linear's forward (per-layer form), a cosine Linear computing W(theta)
    (fails the plain layer check; planned as an affine map read off the module), an RMSNorm; output [b, 2]."""
    class Tagged(nn.Linear):
        pass

    class Cosine(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Tagged(3, 64)
            self.norm = nn.RMSNorm(64)
            self.b = Cosine(64, 1)  # 17% of the parameters: auto stays layerwise
            self.c = Tagged(1, 2)

        def forward(self, x):
            return self.c(torch.tanh(self.b(self.norm(torch.tanh(self.a(x))))))
    return M(), torch.randn(n, 3)


def lstm(n=4):
    """nn.LSTM: its fused weights reach no hook; captured through the unrolled recurrence; output [b, 2]."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])
    return M(), torch.randn(n, 4, 3)


def parametrized(n=5):
    """Linear layers under torch.nn.utils.parametrizations (weight norm, orthogonal): the effective weight's
    per-example gradients mapped to the originals by one batched VJP; output [b, 2]."""
    from torch.nn.utils import parametrizations as P

    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), P.weight_norm(nn.Linear(6, 6)), nn.Tanh(),
                         P.orthogonal(nn.Linear(6, 6)), nn.Tanh(), nn.Linear(6, 2)), torch.randn(n, 3)


def conv_transpose(n=4):
    """ConvTranspose2d (stride, padding, output_padding, groups) and ConvTranspose1d (dilation, no bias): the
    weight by the adjoint convolution, the bias as its own materialized plan; output [b, 3]."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
            self.up1 = nn.ConvTranspose1d(6, 3, 2, stride=2, dilation=2, bias=False)
            self.head = nn.Linear(3, 3)

        def forward(self, x):
            h = torch.tanh(self.up(x)).mean(2)  # [b, 6, W']
            return self.head(torch.tanh(self.up1(h)).mean(2))
    return M(), torch.randn(n, 4, 3, 4)


def conv3d(n=3):
    """Conv3d ('same' reflect padding, groups) into ConvTranspose3d (stride): video-shaped inputs; output [b, 2]."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv3d(2, 4, 3, padding="same", padding_mode="reflect", groups=2)
            self.t = nn.ConvTranspose3d(4, 3, 2, stride=2)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.t(torch.tanh(self.c(x)))).flatten(2).mean(2))
    return M(), torch.randn(n, 2, 3, 4, 4)


def hand_written(n=5):
    """Layers written by hand in the NTK parametrisation (``x @ W / sqrt(d) + 0.1 b``), an ``F.linear`` on raw
    parameters, a ``torch.matmul`` over a sequence, and a weight also used elementwise (stays on torch.func);
    output [b, 2]."""
    import math

    class NTKLinear(nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.W, self.b = nn.Parameter(torch.randn(i, o)), nn.Parameter(torch.randn(o))

        def forward(self, x):
            return x @ self.W / math.sqrt(self.W.shape[0]) + 0.1 * self.b

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Parameter(0.3 * torch.randn(3, 8))
            self.l1 = NTKLinear(8, 16)
            self.w, self.c = nn.Parameter(0.3 * torch.randn(16, 16)), nn.Parameter(0.1 * torch.randn(16))
            self.odd = nn.Parameter(0.3 * torch.randn(4, 4))
            self.out = NTKLinear(16, 2)

        def forward(self, x):  # x [b, T, 3]
            h = torch.tanh(torch.matmul(x, self.seq)).mean(1)
            h = torch.relu(self.l1(h))
            h = torch.tanh(nn.functional.linear(h, self.w, self.c))
            # odd: in a product and elementwise (its diagonal)
            h = torch.tanh(h + (h[:, :4] @ self.odd).sum(1, keepdim=True) * self.odd.diagonal().sum())
            return self.out(h)
    return M(), torch.randn(n, 4, 3)


def matmul_layouts(n=5):
    """Parameters multiplied directly in the other layouts: ``W @ h`` (a token-mixing matrix on the left of
    ``[b, T, d]``), per-head weights ``[H, d_in, d_out]`` on ``[b, H, S, d_in]`` (grouped), and
    ``torch.addmm(bias, h, W)``; output [b, 4]."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Parameter(0.5 * torch.randn(5, 4))
            self.heads = nn.Parameter(0.5 * torch.randn(2, 3, 6))
            self.w2, self.b2 = nn.Parameter(0.3 * torch.randn(12, 4)), nn.Parameter(0.1 * torch.randn(4))

        def forward(self, x):  # x [b, 4, 6]
            b = x.shape[0]
            h = torch.tanh(self.mix @ x)  # [b, 5, 6]: mixes the 4 tokens
            h = h.reshape(b, 5, 2, 3).transpose(1, 2)  # [b, 2 heads, 5, 3]
            h = torch.tanh(torch.matmul(h, self.heads))  # [b, 2, 5, 6]
            return torch.addmm(self.b2, h.mean(2).reshape(b, 12), self.w2)
    return M(), torch.randn(n, 4, 6)


def encoder_decoder(n=5):
    """nn.TransformerEncoder + nn.TransformerDecoder (self-attention, cross-attention on the memory, feed-forward,
    norms), mean-pooled, linear head; output [b, 3]."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1)
            self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1)
            self.head = nn.Linear(8, 3)

        def forward(self, x):  # x [b, 5, 8]: the decoder reads its first 3 positions, attends to all 5
            return self.head(self.dec(x[:, :3], self.enc(x)).mean(1))
    return M(), torch.randn(n, 5, 8)


def conv_prelu(n=5):
    """Convolutions over many positions (materialized forms: ghost saves nothing) and a PReLU on torch.func:
    ``auto`` takes one whole-model Jacobian (the fallback's pass would cost more than layerwise saves)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3)), torch.randn(n, 3, 12, 12)


ZOO = {f.__name__: f for f in (encoder_decoder, matmul_layouts, conv_prelu, hand_written, conv3d, conv_transpose, parametrized, vit_tiny, subclasses, lstm, attention, resnet_inplace, mlp_paper, cnn_strided, resnet_small, layernorm_seq, shared_linear, embedding_bag,
                               batchnorm_eval, conv1d_groupnorm, generic_params, tied_and_outside_use)}


def zoo_model(name, dtype):
    """``ZOO[name]`` built with seed 0 and cast to ``dtype`` (its inputs too, unless they are ids)."""
    torch.manual_seed(0)
    m, x = ZOO[name]()
    m = m.to(dtype)
    return m, (x.to(dtype) if x.is_floating_point() else x)


def rel_error(a, b):
    """``|a - b| / |b|`` in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())
