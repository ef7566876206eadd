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

from lazyhasty import Monitor, read_monitor_log  # noqa: E402
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
    rows = read_monitor_log(tmp_path / "mon.jsonl")[1]
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
    assert [r["step"] for r in read_monitor_log(tmp_path / "mon.jsonl")[1]] == [3, 6]


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


def _ddp_run(tmp_path, strategy, mode):
    """tests/lightning_ddp_run.py over 2 CPU processes (gloo), in a subprocess bounded in time (a hang fails)."""
    import os
    import subprocess
    from pathlib import Path

    pytest.importorskip("lightning", reason="pip install lightning")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(root / "tests" / "lightning_ddp_run.py"), str(tmp_path), strategy, mode],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("strategy,mode", [("ddp_spawn", "rank0"), ("ddp", "group")])
def test_lightning_callback_over_two_processes(tmp_path, strategy, mode):
    """Both ranks get the same values (rank 0's whole probe set broadcast, or each rank's half over the group),
    equal to one process measuring the same model on the whole probe set; only rank 0 writes the logger's and
    the Monitor's files."""
    import csv

    proc = _ddp_run(tmp_path, strategy, mode)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"logged-rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in seen] == [2, 2]
    metrics = ("ntk_alignment", "sign_similarity", "repr_alignment", "param_distance")
    logged = [{step: {k: v[k] for k in metrics} for step, v in s["logged"]} for s in seen]
    assert sorted(logged[0]) == [2, 4] and logged[0].keys() == logged[1].keys()
    for step in logged[0]:
        for k in metrics:
            assert logged[1][step][k] == pytest.approx(logged[0][step][k], rel=1e-12, abs=1e-12)
    assert seen[0]["callback_metrics"] == seen[1]["callback_metrics"]  # EarlyStopping decides alike
    assert set(seen[0]["callback_metrics"]) == set(metrics)

    # one process, the same model states, the whole probe set
    sys.path.insert(0, str(tmp_path.parent))
    import importlib.util

    spec = importlib.util.spec_from_file_location("lightning_ddp_run", __file__.replace("test_integrations.py",
                                                                                        "lightning_ddp_run.py"))
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    x, _ = run.data()
    one = Monitor(run.net(), x, metrics=metrics)
    for step in (2, 4):
        states = [torch.load(tmp_path / f"state-{step}-rank{r}.pt") for r in (0, 1)]
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # DDP kept the ranks in step
        net = run.net()
        net.load_state_dict(states[0])
        want = one.measure(net)
        for k in metrics:
            assert logged[0][step][k] == pytest.approx(want[k], rel=1e-10, abs=1e-12), (step, k)
        assert want["ntk_alignment"] < 1.0

    rows = read_monitor_log(tmp_path / "mon-rank0.jsonl")[1]
    assert [r["step"] for r in rows] == [2, 4]
    rank1 = tmp_path / "mon-rank1.jsonl"  # the group Monitor's sink on rank 1: never written
    assert not rank1.exists() or read_monitor_log(rank1)[1] == []
    tables = list(tmp_path.rglob("metrics.csv"))
    assert len(tables) == 1  # one logger directory: rank 0's
    table = list(csv.DictReader(open(tables[0])))
    assert [int(r["step"]) for r in table if r.get("ntk_alignment")] == [2, 4]  # each step once
    assert float(table[-1]["ntk_alignment"]) == pytest.approx(logged[0][4]["ntk_alignment"], rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fail", "groupfail"])
def test_lightning_callback_failure_on_rank_zero_raises_on_every_rank(tmp_path, mode):
    """A measurement that raises on rank 0 (which measures for all, or its shard of a group Monitor) raises on
    rank 1 too, naming it, instead of leaving rank 1 in a collective until the group's timeout."""
    proc = _ddp_run(tmp_path, "ddp", mode)
    assert proc.returncode != 0
    assert "a model that cannot be measured" in (tmp_path / "error-rank0.txt").read_text()
    other = (tmp_path / "error-rank1.txt").read_text()
    assert "rank 0" in other and "a model that cannot be measured" in other
    assert not read_monitor_log(tmp_path / "mon-rank0.jsonl")[1]  # no row for the failed measurement


def test_file_sinks_survive_pickling_into_another_process(tmp_path):
    """Lightning's ddp_spawn pickles the callbacks, Monitor and sinks included: an open file sink pickles and
    goes on appending to the same run (a file handle could not be pickled before)."""
    import pickle

    from lazyhasty.monitor import CSVSink, JSONLSink

    x, _ = _data(8)
    net = _net()
    mon = Monitor(copy.deepcopy(net), x, metrics=("ntk_alignment",),
                  sinks=[tmp_path / "m.jsonl", CSVSink(tmp_path / "m.csv")])
    mon.log(net, 0)
    twin = pickle.loads(pickle.dumps(mon))
    twin.log(net, 1)
    twin.close()
    mon.close()
    assert [r["step"] for r in read_monitor_log(tmp_path / "m.jsonl")[1]] == [0, 1]
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0].split(",")[0] == "step" and [ln.split(",")[0] for ln in lines[1:]] == ["0", "1"]
    assert isinstance(twin.sinks[0], JSONLSink)


def test_lightning_callback_class_pickles():
    pytest.importorskip("lightning", reason="pip install lightning")
    import pickle

    from lazyhasty.integrations import LazyhastyCallback

    x, _ = _data(8)
    cb = pickle.loads(pickle.dumps(LazyhastyCallback(Monitor(_net(), x), every_n_steps=2)))
    assert type(cb) is LazyhastyCallback and cb.monitor.every == 2


def test_monitor_log_write_false_leaves_the_sinks_alone(tmp_path):
    x, _ = _data(8)
    net = _net()
    mon = Monitor(copy.deepcopy(net), x, metrics=("ntk_alignment",), sinks=[tmp_path / "m.jsonl"])
    values = mon.log(net, 0, write=False)
    mon.close()
    assert "ntk_alignment" in values and read_monitor_log(tmp_path / "m.jsonl")[1] == []


def _geometric_steps(losses, q):
    """The steps the paper's logging picks: the first loss (L0), then each first loss below L0 q^m."""
    steps, L0, m = [], None, 1
    for step, loss in losses:
        if L0 is None:
            L0 = loss
            steps.append(step)
        elif loss < L0 * q ** m:
            while loss < L0 * q ** m:
                m += 1
            steps.append(step)
    return steps


def _learnable(n=48):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    return x, (x @ torch.randn(3, 4, generator=g)).argmax(1)  # a loss that falls through several levels


def test_lightning_callback_geometric_logs_at_the_loss_levels(tmp_path):
    L = pytest.importorskip("lightning", reason="pip install lightning")
    from lazyhasty.integrations import LazyhastyCallback

    x, y = _learnable()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, idx):
            return {"loss": nn.functional.cross_entropy(self.net(batch[0]), batch[1])}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    class Losses(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append((trainer.global_step, float(outputs["loss"])))

    module, losses = Module(), Losses()
    cb = LazyhastyCallback(Monitor(copy.deepcopy(module.net), x, metrics=("ntk_alignment",)), geometric=0.8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=48)
    L.Trainer(max_steps=25, logger=False, callbacks=[cb, losses], enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").fit(module, loader)
    want = _geometric_steps(losses.seen, 0.8)
    assert len(want) >= 3  # the loss fell through at least two levels
    assert [s for s, _ in cb.logged] == want
    with pytest.raises(ValueError, match="not both"):
        LazyhastyCallback(Monitor(_net(), x, metrics=("ntk_alignment",)), geometric=0.8, every_n_steps=2)


def test_trainer_callback_geometric_logs_at_the_reported_loss_levels(tmp_path):
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    from lazyhasty.integrations import LazyhastyTrainerCallback

    x, y = _learnable()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}

    model = Model()
    cb = LazyhastyTrainerCallback(Monitor(copy.deepcopy(model.net), x, metrics=("ntk_alignment",)), geometric=0.8)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=25, per_device_train_batch_size=48,
                                          learning_rate=0.5, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, optim="sgd", lr_scheduler_type="constant")
    trainer = transformers.Trainer(model=model, args=args, callbacks=[cb],
                                   train_dataset=[{"x": x[i], "labels": y[i]} for i in range(len(x))])
    trainer.train()
    reported = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h and "ntk_alignment" not in h]
    want = _geometric_steps(reported, 0.8)
    assert len(want) >= 3
    assert [s for s, _ in cb.logged] == want
    assert [h["step"] for h in trainer.state.log_history if "ntk_alignment" in h] == want


def test_trainer_callback_writes_the_sinks_on_world_process_zero_only(tmp_path):
    pytest.importorskip("transformers", reason="pip install transformers")
    from lazyhasty.integrations import LazyhastyTrainerCallback

    x, _ = _data(8)
    net = _net()
    cb = LazyhastyTrainerCallback(Monitor(copy.deepcopy(net), x, metrics=("ntk_alignment",),
                                          sinks=[tmp_path / "m.jsonl"]), every_n_steps=1,
                                  trainer=types.SimpleNamespace(log=lambda values: None))
    for step, zero in ((1, False), (2, True)):  # a torchrun process other than zero, then process zero
        cb.on_step_end(None, types.SimpleNamespace(global_step=step, is_world_process_zero=zero), None, model=net)
    cb.monitor.close()
    assert [s for s, _ in cb.logged] == [1, 2]  # both measured
    assert [r["step"] for r in read_monitor_log(tmp_path / "m.jsonl")[1]] == [2]
