"""Monitor inside Lightning and Hugging Face trainers, and the W&B sink, each in a tiny real run on CPU."""
import copy
import json
import sys
import types

import pytest
import torch
from torch import nn

# torchvision is installed without its compiled ops: Lightning imports it, which needs this stub first
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

from lazyhasty import Monitor  # noqa: E402
from lazyhasty.metrics import ntk_alignment  # noqa: E402
from lazyhasty.regimes import AlphaScaled  # noqa: E402


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4))


def _data(n=48):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_lightning_callback_in_a_real_run(tmp_path):
    L = pytest.importorskip("lightning", reason="pip install lightning")
    from lightning.pytorch.loggers import CSVLogger

    from lazyhasty.integrations import lightning_callback

    x, y = _data()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = AlphaScaled(_net(), 10.0)  # an alpha-scaled model inside Lightning

        def training_step(self, batch, idx):
            xb, yb = batch
            return nn.functional.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.05)

    module = Module()
    f0_before = [p.clone() for p in module.net.f0.parameters()]
    mon = Monitor(module.net, x, every=2, sinks=[tmp_path / "mon.jsonl"])
    cb = lightning_callback(mon, get_model=lambda m: m.net)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = L.Trainer(max_steps=6, logger=CSVLogger(tmp_path), callbacks=[cb], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, loader)
    steps = [s for s, _ in cb.logged]
    assert steps == [2, 4, 6]
    last = cb.logged[-1][1]
    assert last["ntk_alignment"] == pytest.approx(ntk_alignment(module.net, x, kernel="trace"), abs=1e-6)
    assert last["ntk_alignment"] < 1.0
    assert all(torch.equal(a, b) for a, b in zip(f0_before, module.net.f0.parameters()))  # f_0 frozen
    rows = [json.loads(r) for r in (tmp_path / "mon.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == steps
    metrics_csv = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "ntk_alignment" in metrics_csv and "sign_similarity" in metrics_csv


def test_transformers_callback_in_a_real_run(tmp_path):
    transformers = pytest.importorskip("transformers", reason="pip install transformers")

    from lazyhasty.integrations import transformers_callback

    x, y = _data()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = AlphaScaled(_net(), 1.0)

        def forward(self, x, labels=None):
            logits = self.net(x)
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(logits, labels)
            return out

    model = Model()
    data = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    mon = Monitor(model.net, x, every=3)
    cb = transformers_callback(mon, get_model=lambda m: m.net)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                                          learning_rate=0.05, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    assert [s for s, _ in cb.logged] == [3, 6]
    assert cb.logged[-1][1]["ntk_alignment"] == pytest.approx(ntk_alignment(model.net, x, kernel="trace"),
                                                               abs=1e-6)
    assert any("ntk_alignment" in h for h in trainer.state.log_history)


def test_wandb_sink_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install wandb")
    from lazyhasty.monitor import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="lazyhasty-test", dir=str(tmp_path), mode="offline")
    net = _net()
    x, _ = _data()
    mon = Monitor(copy.deepcopy(net), x, sinks=[WandbSink(run)])
    mon.log(net, 0)
    mon.log(net, 1)
    run.finish()
    assert list(tmp_path.rglob("*.wandb"))  # the offline run's file


class _DropoutBatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))

    def forward(self, x):
        return self.body(x)


def test_lightning_callback_class_reaches_every_logger_callback_metrics_and_early_stopping(tmp_path):
    L = pytest.importorskip("lightning", reason="pip install lightning")
    pytest.importorskip("tensorboard", reason="pip install tensorboard")
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lazyhasty.integrations import LazyhastyCallback

    x, y = _data()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _DropoutBatchNormNet()

        def training_step(self, batch, idx):
            xb, yb = batch
            assert self.net.training  # the step after a log trains with dropout / batch statistics
            return nn.functional.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    module = Module()
    init = copy.deepcopy(module.net).train()  # a train-mode init copy with BatchNorm
    mon = Monitor(init, x, metrics=("ntk_alignment", "sign_similarity"))
    cb = LazyhastyCallback(mon, every_n_steps=2, prog_bar=True)  # the measured module found by parameter names
    # stop once the kernel has moved off its init: a lazyhasty metric monitored by EarlyStopping
    stop = EarlyStopping(monitor="ntk_alignment", mode="max", divergence_threshold=0.999999, patience=100,
                         check_on_train_epoch_end=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)  # 6 steps an epoch
    trainer = L.Trainer(max_epochs=5, logger=[CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")],
                        callbacks=[cb, stop], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # log_every_n_steps: the default 50
    trainer.fit(module, loader)
    steps = [s for s, _ in cb.logged]
    assert steps == [2, 4, 6]  # stopped at the end of the first epoch: the threshold was crossed
    assert trainer.global_step == 6 and trainer.should_stop
    last = cb.logged[-1][1]
    assert float(trainer.callback_metrics["ntk_alignment"]) == pytest.approx(last["ntk_alignment"], rel=1e-6)
    assert "ntk_alignment" in trainer.progress_bar_metrics
    assert module.net.training
    net_e, init_e = copy.deepcopy(module.net).eval(), copy.deepcopy(init).eval()
    assert last["ntk_alignment"] == pytest.approx(ntk_alignment(net_e, x, init_e, kernel="trace"), abs=1e-6)
    table = list(__import__("csv").DictReader(open(next((tmp_path / "csv").rglob("metrics.csv")))))
    csv_rows = {int(r["step"]): float(r["ntk_alignment"]) for r in table if r.get("ntk_alignment")}
    assert sorted(csv_rows) == steps and csv_rows[6] == pytest.approx(last["ntk_alignment"], rel=1e-6)
    acc = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("ntk_alignment")] == steps
    assert [e.step for e in acc.Scalars("sign_similarity")] == steps


def test_trainer_callback_reaches_the_trainers_logging_with_a_random_bert(tmp_path):
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    pytest.importorskip("accelerate", reason="pip install accelerate")
    pytest.importorskip("tensorboard", reason="pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lazyhasty.integrations import LazyhastyTrainerCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config)  # random, dropout 0.1 at its default
    assert config.hidden_dropout_prob > 0
    g = torch.Generator().manual_seed(2)
    n, length = 24, 8
    ids = torch.randint(0, 50, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, -2:] = 0
    y = torch.randint(0, 3, (n,), generator=g)
    probe = {"input_ids": ids[:8], "attention_mask": mask[:8], "labels": y[:8]}  # a tokenized batch, labels dropped
    init = copy.deepcopy(model)
    mon = Monitor(init, probe, groups={"train": {"input_ids": ids, "attention_mask": mask, "labels": y}},
                  sinks=[tmp_path / "mon.jsonl"])
    assert mon.metrics == ("repr_alignment", "ntk_alignment")  # no ReLU in BERT: the defaults without signs
    cb = LazyhastyTrainerCallback(mon, every_n_steps=3)
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]} for i in range(n)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6,
                                          per_device_train_batch_size=8, learning_rate=5e-3, logging_steps=2,
                                          report_to=["tensorboard"], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    assert [s for s, _ in cb.logged] == [3, 6]
    assert model.training
    last = cb.logged[-1][1]
    from lazyhasty._outputs import ProbeModel, pack_inputs

    packed, packing = pack_inputs(probe)  # the value: the eval-mode networks on the named inputs, by hand
    want = ntk_alignment(ProbeModel(copy.deepcopy(model).eval(), None, packing), packed,
                         ProbeModel(copy.deepcopy(init).eval(), None, packing), kernel="trace")
    assert last["ntk_alignment"] == pytest.approx(want, abs=1e-6) and 0 < want < 1
    ours = [h for h in trainer.state.log_history if "ntk_alignment" in h]
    assert [h["step"] for h in ours] == [3, 6] and ours[-1]["ntk_alignment"] == last["ntk_alignment"]
    assert "group/train/loss" in ours[-1]
    acc = EventAccumulator(str(next((tmp_path / "out").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    tag = next(t for t in tags if t.endswith("ntk_alignment"))
    assert [e.step for e in acc.Scalars(tag)] == [3, 6]
    assert [json.loads(r)["step"] for r in (tmp_path / "mon.jsonl").read_text().splitlines()] == [3, 6]


@pytest.mark.parametrize("example,needs", [("lightning_monitor.py", "lightning"), ("hf_monitor.py", "transformers")])
def test_examples_run_at_a_small_size(example, needs, monkeypatch):
    import runpy
    from pathlib import Path

    pytest.importorskip(needs)
    monkeypatch.setenv("LAZYHASTY_EXAMPLE_STEPS", "4")
    path = Path(__file__).resolve().parent.parent / "examples" / example
    ns = runpy.run_path(str(path), run_name="__main__")
    if example == "lightning_monitor.py":
        assert set(ns["results"]) == {1.0, 100.0}
        assert all(0 < v["ntk_alignment"] <= 1 + 1e-6 for v in ns["results"].values())
    else:
        assert [h["step"] for h in ns["history"]] == [1, 2, 3, 4]
        assert ns["monitor"].header["probe_examples"] == 8
