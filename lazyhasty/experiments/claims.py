"""The paper's claims as measured numbers, and their verdict over several seeds.

One seed gives one value per claim (:class:`Claim`). Over ``S`` seeds, :func:`claim_over_seeds` gives the
mean, its standard error and a two-sided 95% Student-t interval of the mean (``S - 1`` degrees of freedom),
and decides the claim on the interval, not on the sign of one number:

- ``holds``: the interval lies entirely on the expected side of the reference (``> 0``: lower end above 0);
- ``fails``: the interval lies entirely on the other side (the effect is reversed);
- ``inconclusive``: the interval contains the reference (or fewer than 2 seeds gave a value).

The designs are paired: every seed trains alpha = 1 and alpha = 100 from the *same* initialization and data
order, and claims such as "non-linear minus linear" are differences within one seed, so the interval is on
the per-seed differences. Example, 5 seeds of a difference that should be positive::

    >>> c = claim_over_seeds("noisy loss, non-linear minus linear", "> 0", [0.02, 0.05, -0.01, 0.03, 0.04])
    >>> c["state"], round(c["ci95"][0], 4), c["sign_held"]
    ('inconclusive', -0.0026, 4)

A claim that does not depend on the seed (a closed-form computation) has zero spread: its interval is the
point, and it holds or fails outright.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._stats import t_cdf, t_quantile  # noqa: F401 (the claims' intervals; kept importable from here)

STATES = ("holds", "fails", "inconclusive")


@dataclass
class Claim:
    """One of the paper's claims as one measured number (one seed): ``value`` should satisfy ``expected``."""

    name: str
    value: float
    expected: str  # "> 0" | "< 0" | "> x" | "< x"
    note: str = ""

    @property
    def holds(self) -> bool:
        """The sign test of this one value (over seeds, :func:`claim_over_seeds` decides)."""
        op, ref = parse_expected(self.expected)
        v = float(self.value)
        return bool(np.isfinite(v) and (v > ref if op == ">" else v < ref))

    def as_dict(self) -> dict:
        return {"claim": self.name, "value": float(self.value), "expected": self.expected, "holds": self.holds,
                "note": self.note}


def parse_expected(expected: str) -> tuple[str, float]:
    """``"> 0.9"`` -> ``(">", 0.9)``; anything else is an error naming the text."""
    parts = str(expected).split()
    if len(parts) != 2 or parts[0] not in (">", "<"):
        raise ValueError(f"a claim's expected value must read '> x' or '< x', got {expected!r}")
    return parts[0], float(parts[1])


def claim_over_seeds(name: str, expected: str, values, note: str = "", level: float = 0.95) -> dict:
    """One claim over seeds: ``values`` ``[S]`` (NaN: the seed gave no value, e.g. a run never reached the
    loss where the claim is read). Returns a dict with ``values``, ``n`` (finite values), ``mean``,
    ``stderr``, ``ci95`` ``[lo, hi]`` (t interval of the mean), ``sign_held`` (seeds whose own value has the
    expected sign), ``state`` (holds / fails / inconclusive) and ``holds`` (``state == "holds"``)."""
    op, ref = parse_expected(expected)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    ok = v[np.isfinite(v)]
    n = int(ok.size)
    mean = float(ok.mean()) if n else float("nan")
    if n >= 2:
        sd = float(ok.std(ddof=1))
        se = sd / math.sqrt(n)
        half = t_quantile(0.5 + level / 2.0, n - 1) * se
        lo, hi = mean - half, mean + half
    else:
        se, lo, hi = float("nan"), float("nan"), float("nan")
    if n >= 2 and ((op == ">" and lo > ref) or (op == "<" and hi < ref)):
        state = "holds"
    elif n >= 2 and ((op == ">" and hi < ref) or (op == "<" and lo > ref)):
        state = "fails"
    else:
        state = "inconclusive"
    held = int(np.sum(ok > ref)) if op == ">" else int(np.sum(ok < ref))
    return {"claim": name, "expected": expected, "values": [float(x) for x in v], "n": n, "value": mean,
            "mean": mean, "stderr": se, "ci95": [lo, hi], "sign_held": held, "state": state,
            "holds": state == "holds", "note": note}


def claims_over_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """Match the claims of every seed by name (the order of the first seed) and decide each over seeds."""
    if not per_seed:
        raise ValueError("no seeds to summarize")
    names = [c["claim"] for c in per_seed[0]]
    for s, claims in enumerate(per_seed):
        if [c["claim"] for c in claims] != names:
            raise ValueError(f"seed {s} measured other claims than seed 0: {[c['claim'] for c in claims]} vs {names}")
    out = []
    for i, name in enumerate(names):
        notes = {c[i]["note"] for c in per_seed}
        out.append(claim_over_seeds(name, per_seed[0][i]["expected"], [c[i]["value"] for c in per_seed],
                                    note=notes.pop() if len(notes) == 1 else ""))
    return out


def format_interval(c: dict, digits: int = 4) -> str:
    """``+0.0123 [+0.0050, +0.0196]`` (or the mean alone when there is no interval)."""
    if not np.isfinite(c["mean"]):
        return "n/a"
    if not np.isfinite(c["ci95"][0]):
        return f"{c['mean']:+.{digits}f}"
    lo, hi = c["ci95"]
    return f"{c['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def plot_claims(claims: list[dict], path, title: str = "") -> None:
    """One row per claim: every seed's value (points), the mean and its 95% interval, the reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"holds": "C2", "fails": "C3", "inconclusive": "C7"}
    fig, axes = plt.subplots(len(claims), 1, figsize=(7, 1.1 + 0.9 * len(claims)), squeeze=False)
    for ax, c in zip(axes[:, 0], claims):
        _, ref = parse_expected(c["expected"])
        v = np.asarray(c["values"], float)
        v = v[np.isfinite(v)]
        rng = np.random.default_rng(0)
        ax.plot(v, 0.15 * rng.uniform(-1, 1, v.size), "o", ms=4, alpha=0.6, color="C0")
        if np.isfinite(c["mean"]):
            lo, hi = c["ci95"]
            if np.isfinite(lo):
                ax.plot([lo, hi], [0, 0], "-", lw=3, color=colors[c["state"]])
            ax.plot([c["mean"]], [0], "D", ms=7, color=colors[c["state"]])
        ax.axvline(ref, color="k", lw=0.8)
        ax.set_yticks([])
        ax.set_ylim(-0.5, 0.5)
        label = c["claim"] if len(c["claim"]) < 95 else c["claim"][:92] + "..."
        ax.set_title(f"{label}\n{c['state']} (expected {c['expected']}; {c['sign_held']}/{c['n']} seeds)",
                     fontsize=7, loc="left")
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
