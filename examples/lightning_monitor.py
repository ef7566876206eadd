"""The linearity metrics inside a Lightning run (pip install lightning); seconds on a CPU.

    python examples/lightning_monitor.py
"""
import tempfile

import lightning as L
import torch
from torch import nn

from lazyhasty import Monitor
from lazyhasty.integrations import lightning_callback
from lazyhasty.regimes import AlphaScaled, scaled_lr

torch.manual_seed(0)
x, y = torch.randn(512, 3), torch.randint(0, 4, (512,))


class Module(L.LightningModule):
    def __init__(self, alpha):
        super().__init__()
        self.alpha = alpha
        self.net = AlphaScaled(nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 4)), alpha)

    def training_step(self, batch, idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=scaled_lr(0.5, self.alpha))


for alpha in (1.0, 100.0):
    module = Module(alpha)
    cb = lightning_callback(Monitor(module.net, x[:256], every=20), get_model=lambda m: m.net)
    L.Trainer(max_steps=100, callbacks=[cb], logger=L.pytorch.loggers.CSVLogger(tempfile.mkdtemp()),
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu").fit(module, torch.utils.data.DataLoader(list(zip(x, y)), batch_size=32))
    step, values = cb.logged[-1]
    print(f"alpha={alpha:g} step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
