#!/usr/bin/env bash
# Reproduce the paper's figures from the command line, then one markdown report of every claim.
#
#   bash examples/reproduce_figures.sh [OUT_DIR] [OPTIONS...]
#
# OUT_DIR defaults to ./lazyhasty-runs; OPTIONS go to every `lazyhasty run` (default: --quick, minutes on a
# CPU; pass e.g. `--set seeds=20` for the full runs, hours). LAZYHASTY_EXPERIMENTS picks the experiments
# (default: all six). A killed run rerun with the same command resumes where it stopped.
set -euo pipefail
out=${1:-lazyhasty-runs}
shift || true
options=("$@")
[ ${#options[@]} -eq 0 ] && options=(--quick)
experiments=${LAZYHASTY_EXPERIMENTS:-"quadratic yinyang label-noise cscores spurious modes"}

dirs=()
for name in $experiments; do
  lazyhasty run "$name" "${options[@]}" --out "$out/$name" --no-progress   # Figs. 1-4, Sec. 4; several seeds each
  dirs+=("$out/$name")
done
# Per claim: the mean over seeds, its 95% interval, the seeds with the expected sign and the verdict;
# the figures are copied beside the report.
lazyhasty report "${dirs[@]}" --out "$out/report.md" --title "Lazy vs hasty: my runs"
echo "report: $out/report.md"
