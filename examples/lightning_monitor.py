"""The linearity metrics inside a Lightning run (pip install lightning); seconds on a CPU.

    python examples/lightning_monitor.py            # LAZYHASTY_EXAMPLE_STEPS=20 for a quicker run

A network with dropout and BatchNorm trained at alpha = 1 and alpha = 100: the probes measure it in eval mode
and leave its training untouched; the values reach every logger (here CSV) and ``trainer.callback_metrics``
(EarlyStopping could watch ``ntk_alignment``).
"""
import os
import tempfile

import lightning as L
import torch
from torch import nn

from lazyhasty import Monitor
from lazyhasty.integrations import LazyhastyCallback
from lazyhasty.regimes import AlphaScaled, scaled_lr

STEPS = int(os.environ.get("LAZYHASTY_EXAMPLE_STEPS", "100"))
torch.manual_seed(0)
x, y = torch.randn(512, 3), torch.randint(0, 4, (512,))


class Module(L.LightningModule):
    def __init__(self, alpha):
        super().__init__()
        self.alpha = alpha
        net = nn.Sequential(nn.Linear(3, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))
        self.net = AlphaScaled(net, alpha)

    def training_step(self, batch, idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=scaled_lr(0.5, self.alpha))


results = {}
for alpha in (1.0, 100.0):
    module = Module(alpha)
    out = tempfile.mkdtemp()
    monitor = Monitor(module.net, x[:256], sinks=[os.path.join(out, "probes.jsonl")])  # header beside it
    cb = LazyhastyCallback(monitor, every_n_steps=max(STEPS // 5, 1), prog_bar=True)
    L.Trainer(max_steps=STEPS, callbacks=[cb], logger=L.pytorch.loggers.CSVLogger(out),
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu").fit(module, torch.utils.data.DataLoader(list(zip(x, y)), batch_size=32))
    step, values = cb.logged[-1]
    results[alpha] = values
    print(f"alpha={alpha:g} step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
