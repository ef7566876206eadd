"""A tiny Lightning run over 2 CPU processes (gloo) with LazyhastyCallback, for tests/test_integrations.py.

    python tests/lightning_ddp_run.py OUT STRATEGY MODE      # STRATEGY: ddp | ddp_spawn; MODE: rank0 | group

MODE rank0: a Monitor without a process group, built before fit (rank 0 measures, the values are broadcast);
MODE group: a Monitor over the world group built at setup (each rank measures its half of the probe set);
MODE fail: as rank0, but the measurement raises on rank 0 (each rank writes its exception to OUT/error-rank<r>.txt);
MODE groupfail: as group, but finding the model raises on rank 0 only.
Each rank writes OUT/logged-rank<r>.json (what its callback got) and, at every log, the model's state
(OUT/state-<step>-rank<r>.pt); the Monitor's sink is OUT/mon-rank<r>.jsonl on rank r (only rank 0 may write rows).
"""
import json
import os
import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lazyhasty import Monitor
from lazyhasty.integrations import LazyhastyCallback

METRICS = ("ntk_alignment", "sign_similarity", "repr_alignment", "param_distance")


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (32,), generator=g)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4)).double()


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = net()

    def training_step(self, batch, idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


class Record(L.Callback):
    """What each rank saw, written by the rank itself (the test compares them)."""

    def __init__(self, cb, out):
        self.cb, self.out = cb, out

    def on_exception(self, trainer, pl_module, exception):
        with open(os.path.join(self.out, f"error-rank{trainer.global_rank}.txt"), "w") as f:
            f.write(f"{type(exception).__name__}: {exception}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = trainer.global_rank
        if self.cb.logged and self.cb.logged[-1][0] == trainer.global_step:
            torch.save(pl_module.net.state_dict(), os.path.join(self.out, f"state-{trainer.global_step}-rank{r}.pt"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in METRICS}
        with open(os.path.join(self.out, f"logged-rank{r}.json"), "w") as f:
            json.dump({"logged": self.cb.logged, "callback_metrics": metrics, "world_size": trainer.world_size}, f)


def broken(module):
    raise ValueError("a model that cannot be measured")


def broken_on_rank0(module):
    if dist.get_rank() == 0:
        broken(module)
    return module.net


def main(out, strategy, mode):
    x, y = data()
    init = net()
    if mode in ("rank0", "fail"):
        monitor = Monitor(init, x, metrics=METRICS, sinks=[os.path.join(out, "mon-rank0.jsonl")])
    else:
        def monitor():  # at setup, on every rank: its own half of the probe set, its own sink path
            r = dist.get_rank()
            return Monitor(init, x[r::2], metrics=METRICS, process_group="world",
                           sinks=[os.path.join(out, f"mon-rank{r}.jsonl")])
    cb = LazyhastyCallback(monitor, every_n_steps=2,
                           get_model={"fail": broken, "groupfail": broken_on_rank0}.get(mode))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)  # 4 steps a rank
    trainer = L.Trainer(max_steps=4, strategy=strategy, accelerator="cpu", devices=2, logger=CSVLogger(out),
                        callbacks=[cb, Record(cb, out)], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Module(), loader)


if __name__ == "__main__":
    main(*sys.argv[1:4])
