"""lazyhasty command line.

  lazyhasty demo                      the embedded default: yin-yang, alpha = 1 vs 100, quick (no download)
  lazyhasty run NAME [options]        NAME: yinyang | label-noise | cscores | spurious | quadratic | modes
  lazyhasty info                      which compiled backends this installation has
  lazyhasty check [--device D]        every op on every backend of the device against the reference
  lazyhasty plot RUN_DIR|LOG.jsonl...  paper-style figures of any runs or Monitor logs
  lazyhasty report DIR... [--out F.md] markdown report of experiments' claims with 95% intervals

Every experiment runs several seeds (--set seeds=S) into DIR (default ./lazyhasty-runs/NAME): one seed{s}/
directory each (config.json, JSONL logs under runs/, figures, summary.json), then DIR/summary.json where each
of the paper's claims is decided over seeds: it holds when the 95% interval of its mean lies on the expected
side, fails when on the other side, and is inconclusive otherwise. A killed experiment rerun with the same
command resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXPERIMENT_NAMES = ("yinyang", "label-noise", "cscores", "spurious", "quadratic", "modes")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _load_config(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"lazyhasty: config file {p} not found")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            import tomllib

            cfg = tomllib.loads(text)
        else:
            cfg = json.loads(text)
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(f"lazyhasty: cannot parse config file {p}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise SystemExit(f"lazyhasty: config file {p} must hold a mapping of option names to values")
    return cfg


def _common(p: argparse.ArgumentParser, default_out: str | None) -> None:
    p.add_argument("--out", metavar="DIR", default=default_out,
                   help=f"run directory (default: ./{default_out})" if default_out else
                   "run directory (default: ./lazyhasty-runs/NAME)")
    p.add_argument("--seed", type=int, default=0, help="random seed (init, data, minibatch order)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of experiment options (e.g. {\"seeds\": 10})")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="one experiment option (repeatable), e.g. --set epochs=50 --set lr=0.02")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier experiment in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazyhasty", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="yin-yang at alpha = 1 vs 100 in quick mode (no download, about 30 s on 2 "
                                       "free CPU cores)",
                          description="The paper's yin-yang experiment (Fig. 1) at alpha = 1 vs 100 from one init, "
                                      "quick mode, 3 seeds: no download, about 30 s on 2 free CPU cores (minutes when "
                                      "they are busy). Writes ./lazyhasty-demo/ (or --out): figures and summary.json, "
                                      "each claim decided over the seeds.")
    _common(demo, "lazyhasty-demo")
    run = sub.add_parser("run", help="reproduce one of the paper's experiments",
                         description="Reproduce one of the paper's experiments; each one's options: docs/guide.md, Experiments.")
    run.add_argument("name", choices=EXPERIMENT_NAMES, help="which experiment")
    run.add_argument("--quick", action="store_true", help="small sizes: seconds to a few minutes on a CPU")
    run.add_argument("--dataset", help="digits (default), fashion-mnist, cifar10, celeba, waterbirds (per experiment)")
    run.add_argument("--root", help="folder of a local dataset copy (cifar10, celeba, waterbirds, fashion-mnist)")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="split the linearity probes over N processes (gloo; NCCL, one GPU each, with --device "
                          "cuda); training is replicated, rank 0 writes --out. Under torchrun: its processes")
    _common(run, None)
    sub.add_parser("info", help="print which backends this installation has")
    plot = sub.add_parser("plot", help="paper-style figures from run directories or Monitor logs")
    plot.add_argument("paths", nargs="+", help="run directories (searched for log.jsonl) or .jsonl Monitor logs")
    plot.add_argument("--out", default="lazyhasty-plots", help="folder for the PNGs (default ./lazyhasty-plots)")
    plot.add_argument("--progress", help="x axis column (default train_loss when present, else step)")
    rep = sub.add_parser("report", help="markdown report of experiment directories (claims with 95%% intervals)",
                         description="One markdown report (figures copied beside it) of the claims of one or more "
                                     "experiment directories: per claim the mean over seeds, its 95%% interval, the "
                                     "seeds with the expected sign and the verdict.")
    rep.add_argument("paths", nargs="+", help="experiment directories (each with summary.json)")
    rep.add_argument("--out", default="lazyhasty-report/report.md", help="markdown file to write "
                     "(default ./lazyhasty-report/report.md)")
    rep.add_argument("--intro", metavar="FILE", help="markdown placed under the title (e.g. machine and budget)")
    rep.add_argument("--title", default="Experiments", help="the report's title")
    check = sub.add_parser("check", help="compare every op on every backend with lazyhasty.reference",
                           description="Compare every op on every available backend with lazyhasty.reference on "
                                       "awkward shapes; exit status 1 on any mismatch.")
    check.add_argument("--device", default="all", choices=("cpu", "cuda", "all"),
                       help="where to check (all: cpu, and cuda when torch sees a GPU)")
    check.add_argument("--quick", action="store_true", help="fewer shapes and dtypes (seconds)")
    check.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    check.add_argument("--failures-only", action="store_true", help="print only the rows that are not ok")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from . import _backend

        print(json.dumps(_backend.summary(), indent=2))
        return 0
    if args.command == "plot":
        from .analysis import plot_logs

        try:
            files = plot_logs(args.paths, args.out, progress=args.progress)
        except (FileNotFoundError, ValueError, ImportError) as exc:
            print(f"lazyhasty: {exc}", file=sys.stderr)
            return 2
        print("\n".join(map(str, files)))
        return 0
    if args.command == "report":
        from .experiments.report import report

        try:
            intro = Path(args.intro).read_text() if args.intro else ""
            report(args.paths, args.out, intro=intro, title=args.title)
        except (FileNotFoundError, ValueError) as exc:
            print(f"lazyhasty: {exc}", file=sys.stderr)
            return 2
        print(args.out)
        return 0
    if args.command == "check":
        from . import check

        try:
            return check.main(args.device, args.quick, args.json, show_all=not args.failures_only)
        except RuntimeError as exc:
            print(f"lazyhasty: {exc}", file=sys.stderr)
            return 2
    from .experiments.common import Context, run_experiment

    options = _load_config(args.config)
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"lazyhasty: --set needs KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        options[k.strip()] = _value(v)
    name = "yinyang" if args.command == "demo" else args.name
    quick = True if args.command == "demo" else args.quick
    for key in ("dataset", "root"):
        if getattr(args, key, None):
            options[key] = getattr(args, key)
    out = Path(args.out or Path("lazyhasty-runs") / name)
    ctx = Context(out=out, seed=args.seed, device=args.device, quick=quick, progress=not args.no_progress,
                  options=options, overwrite=args.overwrite)
    from ._launch import run_over_processes, under_torchrun

    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        raise SystemExit(f"lazyhasty: --nproc must be >= 1, got {nproc}")
    try:
        if nproc > 1 or under_torchrun():
            import functools

            summary = run_over_processes(nproc, functools.partial(run_experiment, name), ctx)
            if summary is None:  # a torchrun rank other than 0: rank 0 reports
                return 0
        else:
            summary = run_experiment(name, ctx)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"lazyhasty: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from ._launch import RankFailed
        from ._runlog import RunLocked

        if not isinstance(exc, (RankFailed, RunLocked)):
            raise
        print(f"lazyhasty: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an output directory that cannot be written
        where = exc.filename or out
        print(f"lazyhasty: cannot write {where}: {exc.strerror or exc}; choose another --out", file=sys.stderr)
        return 2
    from .experiments.claims import format_interval

    v = summary["verdicts"]
    print(f"\n{name}: {summary['seeds']} seeds, {summary['wall_time_s']:.1f} s; run directory {out}/")
    print(f"  claims over seeds (mean [95% interval], seeds with the expected sign): {v['holds']} hold, "
          f"{v['fails']} fail, {v['inconclusive']} inconclusive")
    for c in summary["claims"]:
        mark = {"holds": "holds", "fails": "FAILS", "inconclusive": "undecided"}[c["state"]]
        print(f"  [{mark:9s}] {format_interval(c)} (expected {c['expected']}; {c['sign_held']}/{c['n']} seeds): "
              f"{c['claim']}")
    if "final" in summary:
        for run_name, vals in summary["final"].items():
            print(f"  {run_name}: " + ", ".join(f"{k} {v:.4f}" for k, v in vals.items()))
    print("  figures: " + ", ".join(str(out / f) for f in summary.get("figures", [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
