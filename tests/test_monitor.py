"""Monitor: the metrics from any training loop; triggers; sinks; the two-argument metric calls (issue 17)."""
import copy
import csv
import io
import json

import pytest
import torch
from torch import nn

from lazyhasty import Monitor, read_monitor_log
from lazyhasty._progress import Progress
from lazyhasty.metrics import ntk_alignment, representation_alignment, sign_similarity
from lazyhasty.regimes import AlphaScaled, Linearized


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(40, 3)
    y = torch.randint(0, 4, (40,))
    return net, x, y


def _moved(m, scale=0.2):
    m = copy.deepcopy(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    return m


def test_monitor_values_equal_the_functions(tmp_path):
    net, x, y = _setup()
    init = copy.deepcopy(net)
    model = _moved(net)
    mon = Monitor(init, x, groups={"first": (x[:10], y[:10])},
                  metrics=("sign_similarity", "repr_alignment", "ntk_alignment", "ntk_rel_change", "param_distance"),
                  sinks=[tmp_path / "log.jsonl", tmp_path / "log.csv"])
    got = mon.log(model, step=7)
    assert got["sign_similarity"] == pytest.approx(sign_similarity(model, x, init), abs=1e-12)
    assert got["repr_alignment"] == pytest.approx(representation_alignment(model, x, init), abs=1e-6)
    assert got["ntk_alignment"] == pytest.approx(ntk_alignment(model, x, init, kernel="trace"), abs=1e-6)
    assert 0 < got["ntk_rel_change"] and 0 < got["param_distance"]
    with torch.no_grad():
        want = nn.functional.cross_entropy(model(x[:10]), y[:10]).item()
    assert got["group/first/loss"] == pytest.approx(want, rel=1e-6)
    model.train()
    mon.log(model, step=9)
    assert model.training  # modes restored
    mon.close()
    rows = read_monitor_log(tmp_path / "log.jsonl")[1]
    assert [r["step"] for r in rows] == [7, 9] and rows[0]["ntk_alignment"] == got["ntk_alignment"]
    table = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert float(table[0]["sign_similarity"]) == pytest.approx(got["sign_similarity"])


def test_monitor_with_an_alpha_scaled_model_and_a_callable_sink():
    net, x, y = _setup()
    lazy = AlphaScaled(net, 100.0)
    seen = []
    mon = Monitor(lazy, x, sinks=[lambda step, v: seen.append((step, v))])
    assert mon.log(lazy, 0)["ntk_alignment"] == pytest.approx(1.0, abs=1e-6)
    opt = torch.optim.SGD(lazy.parameters(), lr=1e-4)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(lazy(x), y).backward()
        opt.step()
    v = mon.log(lazy, 3)
    assert v["ntk_alignment"] == pytest.approx(ntk_alignment(lazy, x, kernel="trace"), abs=1e-6)
    assert all(not p.requires_grad for p in lazy.f0.parameters())  # f_0 stays frozen, off the optimizer
    assert [s for s, _ in seen] == [0, 3]


def test_triggers():
    net, x, _ = _setup()
    every = Monitor(net, x, metrics=("sign_similarity",), every=5)
    assert [s for s in range(17) if every.due(s)] == [0, 5, 10, 15]
    geo = Monitor(net, x, metrics=("sign_similarity",), geometric=0.5)
    losses = [1.0, 0.9, 0.6, 0.49, 0.45, 0.3, 0.24, 0.05, 0.04]
    due = [s for s, loss in enumerate(losses) if geo.due(s, loss)]
    # L0 = 1: levels 0.5, 0.25, 0.125, ...; 0.05 skips two levels at once; nan never logs
    assert due == [0, 3, 6, 7]
    assert not geo.due(9, float("nan"))
    with pytest.raises(ValueError, match="tracked loss"):
        geo.due(10)


def test_bad_configuration():
    net, x, y = _setup()
    with pytest.raises(ValueError, match="unknown metrics"):
        Monitor(net, x, metrics=("sign_simlarity",))
    with pytest.raises(ValueError, match="needs ReLUs in the model"):
        Monitor(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), x, metrics=("sign_similarity",))
    with pytest.raises(ValueError, match="group 'g'"):
        Monitor(net, x, groups={"g": (x[:5], y[:4])})
    with pytest.raises(ValueError, match="every"):
        Monitor(net, x, every=0)
    with pytest.raises(ValueError, match="geometric"):
        Monitor(net, x, geometric=1.5)


def test_two_argument_metric_calls():
    net, x, _ = _setup()
    lazy = AlphaScaled(copy.deepcopy(net), 10.0)
    with torch.no_grad():
        for p in lazy.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert ntk_alignment(lazy, x, kernel="trace") == pytest.approx(
        ntk_alignment(lazy.model, x, lazy.f0, kernel="trace"), abs=1e-12)
    assert sign_similarity(lazy, x) == sign_similarity(lazy.model, x, lazy.f0)
    assert representation_alignment(lazy, x) == pytest.approx(representation_alignment(lazy.model, x, lazy.f0))
    lin = Linearized(copy.deepcopy(net))
    with torch.no_grad():
        for p in lin.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert ntk_alignment(lin, x, kernel="trace") == pytest.approx(ntk_alignment(lin.model, x, net, kernel="trace"),
                                                                 abs=1e-12)
    with pytest.raises(TypeError, match="pass reference="):
        ntk_alignment(net, x)


def test_progress_without_a_terminal_writes_sparse_plain_lines():
    s = io.StringIO()
    with Progress(10_000, "train", stream=s) as p:
        for _ in range(10_000):
            p.update(1, "loss 0.1")
    text = s.getvalue()
    assert "\r" not in text and text.count("\n") <= 12 and len(text) < 1000


def test_tensorboard_sink_writes_events_that_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'lazyhasty[monitor]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lazyhasty.monitor import TensorBoardSink

    net, x, _ = _setup()
    sink = TensorBoardSink(tmp_path / "tb")
    mon = Monitor(net, x, sinks=[sink])
    v0 = mon.log(net, 0)
    v5 = mon.log(_moved(net), 5)
    mon.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("ntk_alignment")
    assert [e.step for e in events] == [0, 5]
    assert events[0].value == pytest.approx(v0["ntk_alignment"], rel=1e-6)
    assert events[1].value == pytest.approx(v5["ntk_alignment"], rel=1e-6)


def test_plot_command_on_monitor_logs_and_run_dirs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from lazyhasty.__main__ import main
    from lazyhasty.data import yinyang
    from lazyhasty.train import TrainConfig, Trainer

    net, x, y = _setup()
    mon = Monitor(copy.deepcopy(net), x, groups={"a": (x[:10], y[:10])}, sinks=[tmp_path / "logs" / "mon.jsonl"])
    for step in range(3):
        mon.log(_moved(net, 0.1 * step), step)
    mon.close()
    torch.manual_seed(0)
    ds = yinyang(40, seed=0)
    Trainer(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1)), ds,
            TrainConfig(steps=10, lr=0.5, loss="logistic", log_every=5), tmp_path / "runs" / "r1",
            probe_set=ds[:20], probes={"noisy": ds[:10]}).fit()
    assert main(["plot", str(tmp_path / "logs" / "mon.jsonl"), "--out", str(tmp_path / "p1")]) == 0
    assert (tmp_path / "p1" / "linearity.png").stat().st_size > 0 and (tmp_path / "p1" / "groups.png").exists()
    assert main(["plot", str(tmp_path / "runs"), "--out", str(tmp_path / "p2")]) == 0
    assert (tmp_path / "p2" / "linearity.png").exists() and (tmp_path / "p2" / "groups.png").exists()
    assert main(["plot", str(tmp_path / "nothing-here")]) == 2
    assert "not a run directory" in capsys.readouterr().err


# --- rows that say what they are; sinks that never mix runs (issue 27 item 4, issue 28 item 9) -------------
def _header(path):
    if path.suffix == ".jsonl":  # the first row of the log
        return json.loads(path.read_text().splitlines()[0])["run_header"]
    return json.loads((path.parent / (path.name + ".header.json")).read_text())


def test_run_header_says_what_the_rows_are(tmp_path):
    net, x, y = _setup()
    mon = Monitor(net, x, metrics=("ntk_alignment", "sign_similarity"), groups={"g": (x[:7], y[:7])},
                  sinks=[tmp_path / "a.jsonl", tmp_path / "a.csv"], every=3)
    mon.log(_moved(net), 0)
    mon.close()
    for path in (tmp_path / "a.jsonl", tmp_path / "a.csv"):
        h = _header(path)
        assert h["kernel"] == "trace" and h["probe_examples"] == 40 and h["dtype"] == "float32"
        assert h["metrics"] == ["ntk_alignment", "sign_similarity"] and h["groups"] == {"g": 7} and h["every"] == 3
    assert not (tmp_path / "a.jsonl.header.json").exists()  # a .jsonl holds its header: one file to move
    header, rows = read_monitor_log(tmp_path / "a.jsonl")
    assert header == _header(tmp_path / "a.jsonl") == mon.header
    assert len(rows) == 1 and rows[0]["step"] == 0
    assert rows[0]["probe_seconds"] > 0 and 0 < rows[0]["probe_overhead"] <= 1


def test_jsonl_header_row_follows_the_cadence_set_before_the_first_row(tmp_path):
    net, x, _ = _setup()
    mon = Monitor(net, x, metrics=("sign_similarity",), sinks=[tmp_path / "c.jsonl"])
    mon.schedule(every=5)  # what the integrations' every_n_steps does, after the Monitor was built
    mon.log(net, 0)
    mon.close()
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["run_header"]["every"] == 5


def test_plot_reads_a_monitor_log_without_its_header_row(tmp_path):
    from lazyhasty.analysis import find_runs

    net, x, _ = _setup()
    with Monitor(net, x, metrics=("sign_similarity",), sinks=[tmp_path / "p.jsonl"]) as mon:
        mon.log(net, 0)
        mon.log(_moved(net), 1)
    run, = find_runs([tmp_path / "p.jsonl"])
    assert [r["step"] for r in run.rows] == [0, 1]


_SECOND_RUN = """
import sys, torch
from torch import nn
from lazyhasty import Monitor
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
x = torch.randn(40, 3)
try:
    mon = Monitor(net, x, metrics=("sign_similarity",), sinks=[sys.argv[1]], append=sys.argv[2] == "append")
    print("built")
    if sys.argv[2] != "build":
        mon.log(net, 99)
        print("wrote")
except FileExistsError as exc:
    print("refused:", exc)
"""


def _second_run(path, mode):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _SECOND_RUN, str(path), mode], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_one_process_writes_a_log_at_a_time(tmp_path):
    """A second process on a log the first is writing: refused at once (rows there), and with append=True
    refused at its first row (the first holds the file); a process that only builds the same Monitor (another
    rank of a Lightning ddp script) is not. The first run's rows stay whole."""
    net, x, _ = _setup()
    path = tmp_path / "shared.jsonl"
    mon = Monitor(net, x, metrics=("sign_similarity",), sinks=[path])
    assert _second_run(path, "build") == "built\n"  # no row yet: building the same Monitor is fine
    mon.log(net, 0)
    out = _second_run(path, "new")
    assert out.startswith("refused:") and "append=True" in out
    out = _second_run(path, "append")
    assert out.startswith("built\nrefused:") and "being written by another process" in out
    mon.log(net, 1)
    mon.close()
    header, rows = read_monitor_log(path)
    assert header["probe_examples"] == 40 and [r["step"] for r in rows] == [0, 1]
    assert _second_run(path, "append") == "built\nwrote\n"  # once the first is closed, append continues it
    assert [r["step"] for r in read_monitor_log(path)[1]] == [0, 1, 99]


def test_a_process_that_opened_a_log_never_writes_after_another_run(tmp_path):
    """A sink opened on an empty log, and another run's rows written there before this one's first row: the
    first row is refused instead of being appended after the other run's."""
    from lazyhasty.monitor import JSONLSink

    path = tmp_path / "race.jsonl"
    mine = JSONLSink(path)
    mine.open({"format": "mine"})
    other = JSONLSink(tmp_path / "race.jsonl", append=True)
    other(0, {"a": 1})
    other.close()
    with pytest.raises(FileExistsError, match="another run since this sink opened it"):
        mine(0, {"a": 2})
    mine.close()


def test_csv_never_writes_under_a_foreign_header(tmp_path):
    from lazyhasty.monitor import CSVSink

    path = tmp_path / "t.csv"
    sink = CSVSink(path)
    sink(0, {"sign_similarity": 0.9})
    sink.close()
    again = CSVSink(path, append=True)  # a rerun with other metrics (no Monitor, so no run header)
    with pytest.raises(ValueError, match=r"\['step', 'sign_similarity'\].*\['step', 'repr_alignment'\]"):
        again(1, {"repr_alignment": 0.5})
    again.close()
    assert list(csv.DictReader(open(path))) == [{"step": "0", "sign_similarity": "0.9"}]


def test_jsonl_append_sets_a_torn_row_aside(tmp_path):
    from lazyhasty.monitor import JSONLSink

    path = tmp_path / "t.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a"')  # a crash while writing the second row
    sink = JSONLSink(path, append=True)
    with pytest.warns(RuntimeWarning, match="torn"):
        sink(2, {"a": 3})
    sink.close()
    assert [r["step"] for r in read_monitor_log(path)[1]] == [0, 2]
    assert (tmp_path / "t.jsonl.torn").read_text() == '{"step": 1, "a"'


def test_csv_append_sets_a_torn_row_aside(tmp_path):
    from lazyhasty.monitor import CSVSink

    path = tmp_path / "t.csv"
    path.write_text("step,a\n0,1\n1,0.12")  # a crash while writing the second row
    sink = CSVSink(path, append=True)
    with pytest.warns(RuntimeWarning, match="torn"):
        sink(2, {"a": 3})
    sink.close()
    assert list(csv.DictReader(open(path))) == [{"step": "0", "a": "1"}, {"step": "2", "a": "3"}]
    assert (tmp_path / "t.csv.torn").read_text() == "1,0.12"


def test_sinks_are_exported_beside_monitor():
    import lazyhasty
    from lazyhasty import monitor

    for name in ("TensorBoardSink", "WandbSink", "JSONLSink", "CSVSink"):
        assert getattr(lazyhasty, name) is getattr(monitor, name)


# --- output=, dtype=, block_size=, kernel= reach every metric (issue 27 item 6) --------------------------
def test_monitor_options_reach_the_metrics():
    net, x, _ = _setup()
    init, model = copy.deepcopy(net), _moved(net)
    mon = Monitor(init, x, metrics=("ntk_alignment", "repr_alignment"), kernel="full", dtype=torch.float64,
                  block_size=7)
    got = mon.measure(model)
    assert mon.probe.ntk.options["block_size"] == 7 and mon.probe.ntk.options["dtype"] == torch.float64
    assert mon.header["kernel"] == "full" and mon.header["dtype"] == "float64"
    want = ntk_alignment(model, x, init, kernel="full", dtype=torch.float64)
    assert got["ntk_alignment"] == pytest.approx(want, abs=1e-12)
    assert got["ntk_alignment"] != pytest.approx(ntk_alignment(model, x, init, kernel="trace"), abs=1e-3)
    assert got["repr_alignment"] == pytest.approx(representation_alignment(model, x, init, dtype=torch.float64),
                                                  abs=1e-12)


class _Output(dict):
    """What a Hugging Face ModelOutput looks like to a probe: a mapping with attributes."""

    def __getattr__(self, k):
        return self[k]


class _ReturnsOutput(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x=None, *, inputs=None, scale=None):
        x = inputs * scale if inputs is not None else x
        h = self.net(x)
        return _Output(logits=h, hidden=h.relu())


def test_a_model_output_is_measured_through_its_logits():
    net, x, y = _setup()
    init, model = _ReturnsOutput(copy.deepcopy(net)), _ReturnsOutput(_moved(net))
    mon = Monitor(init, x, metrics=("ntk_alignment", "sign_similarity"), groups={"g": (x, y)})
    got = mon.measure(model)
    assert got["ntk_alignment"] == pytest.approx(
        ntk_alignment(model, x, init, kernel="trace", output=lambda o: o.logits), abs=1e-6)
    with torch.no_grad():
        want = nn.functional.cross_entropy(model(x).logits, y).item()
    assert got["group/g/loss"] == pytest.approx(want, rel=1e-6)
    # output= chooses another tensor
    other = Monitor(init, x, metrics=("ntk_alignment",), output="hidden").measure(model)["ntk_alignment"]
    assert other == pytest.approx(ntk_alignment(model, x, init, kernel="trace", output="hidden"), abs=1e-6)
    with pytest.raises(TypeError, match="output="):
        Monitor(init, x, metrics=("ntk_alignment",), output="nothing")


def test_named_input_probes_are_keyword_arguments():
    net, x, y = _setup()
    init, model = _ReturnsOutput(copy.deepcopy(net)), _ReturnsOutput(_moved(net))
    scale = torch.full((40, 1), 2.0)
    batch = {"inputs": x, "scale": scale, "labels": y}  # labels dropped from the inputs
    mon = Monitor(init, batch, metrics=("ntk_alignment", "sign_similarity", "repr_alignment"),
                  groups={"g": batch})
    got = mon.measure(model)
    assert got["ntk_alignment"] == pytest.approx(
        ntk_alignment(model, 2 * x, init, kernel="trace", output="logits"), abs=1e-6)
    assert got["sign_similarity"] == pytest.approx(sign_similarity(model, 2 * x, init), abs=1e-12)
    with torch.no_grad():
        want = nn.functional.cross_entropy(model(2 * x).logits, y).item()
    assert got["group/g/loss"] == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="different numbers of rows"):
        Monitor(init, {"inputs": x, "scale": scale[:3]})


def test_param_distance_refuses_an_unrelated_model():
    net, x, _ = _setup()
    mon = Monitor(net, x, metrics=("param_distance",))
    shares_names = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4))  # '0.*' match, '2.*' differ
    with pytest.raises(ValueError, match="param_distance"):
        mon.measure(shares_names)
    fewer = nn.Sequential(nn.Linear(3, 16))
    with pytest.raises(ValueError, match="missing"):
        mon.measure(fewer)


# --- budget= (issue 27 item 5): the cadence stretches, the values do not change ------------------------------
class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_budget_stretches_the_cadence_to_the_share_of_wall_time(monkeypatch):
    import lazyhasty.monitor as monitor_module

    net, x, _ = _setup()
    clock = _Clock()
    monkeypatch.setattr(monitor_module.time, "perf_counter", clock)
    mon = Monitor(net, x, metrics=("sign_similarity",), every=2, budget=0.1)
    moved = _moved(net)
    exact = mon.measure(moved)
    real_measure = mon.measure

    def slow_measure(model):  # a log costs 1 s of the fake clock
        clock.now += 1.0
        return real_measure(model)

    mon.measure = slow_measure
    logged = []
    for step in range(400):
        clock.now += 0.1  # the training step: 0.1 s
        if mon.due(step):
            logged.append((step, mon.log(moved, step)))
    steps = [s for s, _ in logged]
    assert steps[0] == 0 and all(s % 2 == 0 for s in steps)  # still on the every= grid
    # a 1 s log needs >= 9 s (90 steps) of loop time after it at a 10 % budget
    assert all(b - a >= 90 for a, b in zip(steps, steps[1:])) and len(steps) >= 4
    assert all(v["sign_similarity"] == exact["sign_similarity"] for _, v in logged)  # exactness untouched
    assert all(v["probe_seconds"] == pytest.approx(1.0) for _, v in logged)
    assert logged[-1][1]["probe_overhead"] <= 0.1 + 1 / 40 and logged[-1][1]["probe_overhead"] > 0.05
    with pytest.raises(ValueError, match="budget"):
        Monitor(net, x, budget=1.5)


def test_budget_keeps_a_crossed_geometric_level_due(monkeypatch):
    import lazyhasty.monitor as monitor_module

    net, x, _ = _setup()
    clock = _Clock()
    monkeypatch.setattr(monitor_module.time, "perf_counter", clock)
    mon = Monitor(net, x, metrics=("sign_similarity",), geometric=0.5, budget=0.5)
    assert mon.due(0, 1.0)
    mon._last_cost, mon._last_end = 2.0, clock.now  # the first log took 2 s: the next needs 2 s of loop time
    clock.now += 1.0
    assert not mon.due(1, 0.4)  # level 0.5 crossed, but too soon
    assert not mon.due(2, 0.45)
    clock.now += 1.5
    assert mon.due(3, 0.45)  # still due: the crossing was held back, not dropped
    assert not mon.due(4, 0.44)
