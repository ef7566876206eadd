"""The linearity metrics inside a Hugging Face Trainer run (pip install transformers accelerate); seconds on a CPU.

    python examples/hf_monitor.py
"""
import tempfile

import torch
import transformers
from torch import nn

from lazyhasty import Monitor
from lazyhasty.integrations import transformers_callback
from lazyhasty.regimes import AlphaScaled

torch.manual_seed(0)
x, y = torch.randn(512, 3), torch.randint(0, 4, (512,))


class Model(nn.Module):
    def __init__(self, alpha):
        super().__init__()
        self.net = AlphaScaled(nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 4)), alpha)

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


model = Model(1.0)
cb = transformers_callback(Monitor(model.net, x[:256], every=20), get_model=lambda m: m.net)
args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=100, per_device_train_batch_size=32,
                                      learning_rate=0.5, report_to=[], save_strategy="no", use_cpu=True,
                                      disable_tqdm=True, logging_steps=20)
transformers.Trainer(model=model, args=args, train_dataset=[{"x": a, "labels": b} for a, b in zip(x, y)],
                     callbacks=[cb]).train()
for step, values in cb.logged:
    print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
