"""`lazyhasty check`: every op on every backend of a device against `lazyhasty.reference`.

Run right after installing (`lazyhasty check --device all`): for each op and each backend that can run
on the device (cpp, cuda, triton, torch) it compares the result with the plain-torch reference on awkward
shapes (sizes that do not divide block sizes, one example, non-contiguous inputs, float32/float64 and the
half types where the op takes them), and prints one row per case: op, backend, device, case, max error,
tolerance, time. Backends that cannot run are listed as skipped, with the reason. The exit status is
non-zero when any case mismatches or raises.

Example:
    >>> results = run_checks("cpu", quick=True)
    >>> all(r.status in ("ok", "skipped") for r in results)
    True
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from . import _backend
from . import reference as R
from ._precision import exact_fp32


@dataclasses.dataclass
class CheckResult:
    """One row of the check: one case of one op on one backend and device.

    Attributes:
        op: the op checked (e.g. `"sign_mismatch"`, `"ntk_gram"`).
        backend: `"cpp"`, `"cuda"`, `"triton"` or `"torch"`.
        device: `"cpu"` or `"cuda"`.
        case: the input case (shape, dtype, layout).
        max_error: the largest error against the reference (None when it did not run).
        tolerance: the error allowed.
        seconds: how long the case took.
        status: `"ok"`, `"FAIL"` (error above tolerance), `"error"` (it raised) or `"skipped"`.
        note: the reason for a skip, or the exception raised.
    """

    op: str
    backend: str
    device: str
    case: str
    max_error: float | None
    tolerance: float | None
    seconds: float
    status: str  # ok | FAIL | error | skipped
    note: str = ""


def _devices(which: str) -> list[str]:
    if which not in ("cpu", "cuda", "all"):
        raise ValueError(f"--device must be cpu, cuda or all, got {which!r}")
    if which == "cpu":
        return ["cpu"]
    if which == "cuda" and not _backend.cuda_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    return ["cpu"] + (["cuda"] if _backend.cuda_available() else []) if which == "all" else ["cuda"]


def _run(op: str, backend: str, device: str, case: str, fn: Callable[[], tuple[float, float]]) -> CheckResult:
    t0 = time.perf_counter()
    try:
        err, tol = fn()
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - any failure is a row of the table, not a crash
        return CheckResult(op, backend, device, case, None, None, time.perf_counter() - t0, "error",
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
    ok = err <= tol
    return CheckResult(op, backend, device, case, float(err), float(tol), time.perf_counter() - t0,
                       "ok" if ok else "FAIL")


def _skip(op: str, backend: str, device: str) -> CheckResult:
    return CheckResult(op, backend, device, "-", None, None, 0.0, "skipped",
                       _backend._why_not(backend, torch.device(device)))


def _backends(op: str, device: str, candidates=_backend.BACKENDS) -> Iterator[tuple[str, CheckResult | None]]:
    avail = _backend.available(device)
    for b in candidates:
        yield b, (None if b in avail else _skip(op, b, device))


# --- cases ---------------------------------------------------------------------------------------
def _sign_inputs(device: str, quick: bool):
    """(label, x) with awkward shapes: one unit, one example, 33 units, a transposed (strided) view."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 1), (7, 33), (129, 100)] if quick else [(1, 1), (7, 33), (129, 100), (3, 1000), (513, 65)]
    dtypes = [torch.float32, torch.float64] if quick else [torch.float32, torch.float64, torch.float16,
                                                           torch.bfloat16]
    for dt in dtypes:
        for n, u in shapes:
            x = torch.randn(n, u, generator=g).to(device, dt)
            x[x.abs() < 0.1] = 0.0  # exact zeros count as "off"
            yield f"{n}x{u} {str(dt).removeprefix('torch.')}", x
        t = torch.randn(40, 9, generator=g).to(device, dt).T  # [9, 40], strides (1, 9)
        yield f"9x40 {str(dt).removeprefix('torch.')} non-contiguous", t


def _check_signs(device: str, quick: bool) -> list[CheckResult]:
    from .ops.signs import pack_signs, sign_mismatch

    out = []
    cases = list(_sign_inputs(device, quick))
    for op in ("pack_signs", "sign_mismatch"):
        for backend, skipped in _backends(op, device):
            if skipped:
                out.append(skipped)
                continue
            for label, x in cases:
                if op == "pack_signs":
                    def fn(x=x):
                        got = pack_signs(x, backend=backend).cpu()
                        return float((got != R.pack_signs(x.float().cpu())).sum()), 0.0
                else:
                    def fn(x=x):
                        other = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
                        bits = R.pack_signs(other)
                        got = sign_mismatch(x, bits.to(x.device), backend=backend).cpu()
                        return float((got - R.sign_mismatch(x.float().cpu(), bits)).abs().max()), 0.0
                out.append(_run(op, backend, device, label, fn))
    return out


def _check_triton_ntk(device: str, quick: bool) -> list[CheckResult]:
    """The Triton NTK kernels against their float64 torch twins (interpreter on CPU: tiny sizes)."""
    out = []
    if "triton" not in _backend.available(device):
        return [_skip(op, "triton", device) for op in ("ntk.gram", "ntk.ghost_gram", "ntk.alignment_partials")]
    from .ntk.forms import triton_kernels as T
    from .ntk.forms import twins as twin

    interp = _backend.triton_interpreted()
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    for M, N, P, k in ([(1, 1, 1, 1), (33, 7, 45, 1), (7, 7, 36, 4)] if quick or interp else
                       [(1, 1, 1, 1), (33, 7, 45, 1), (7, 7, 36, 4), (300, 300, 1000, 1), (257, 129, 513, 10)]):
        x = rnd(M, P * k)
        y = x if M == N else rnd(N, P * k)

        def fn(x=x, y=y, k=k):
            want = twin.gram(x, y, x is y, k)
            got = T.gram(x, y, x is y, interp, k)
            return float((got.double() - want).abs().max()), 1e-5 * (1 + float(want.abs().max()))
        out.append(_run("ntk.gram", "triton", device, f"{M}x{N}x{P} outputs={k}", fn))
    for bi, bj, k, S, din, dout in [(1, 1, 1, 1, 1, 1), (5, 3, 2, 3, 7, 5)] + ([] if quick or interp else
                                                                             [(33, 33, 10, 4, 64, 16)]):
        a_i, g_i = rnd(bi, S, din), rnd(bi, k, S, dout)
        sym = bi == bj
        a_j, g_j = (a_i, g_i) if sym else (rnd(bj, S, din), rnd(bj, k, S, dout))

        def fn(a_i=a_i, a_j=a_j, g_i=g_i, g_j=g_j, sym=sym):
            want = twin.ghost_gram(a_i, a_j, g_i, g_j, sym)
            got = T.ghost_gram(a_i, a_j, g_i, g_j, sym, interp)
            return float((got.double() - want).abs().max()), 1e-4 * (1 + float(want.abs().max()))
        out.append(_run("ntk.ghost_gram", "triton", device, f"b={bi}x{bj} k={k} S={S} {din}->{dout}", fn))
    for M, N, Pt, P0, sym in [(1, 1, 1, 1, False), (33, 7, 45, 70, False), (40, 40, 33, 31, True)]:
        ft_i, f0_i = rnd(M, Pt), rnd(M, P0)
        ft_j, f0_j = (ft_i, f0_i) if sym else (rnd(N, Pt), rnd(N, P0))

        def fn(ft_i=ft_i, ft_j=ft_j, f0_i=f0_i, f0_j=f0_j, sym=sym):
            want = twin.alignment_partials(ft_i, ft_j, f0_i, f0_j, sym, 1)
            got = T.alignment_partials(ft_i, ft_j, f0_i, f0_j, sym, interp, 1)
            return float(((got.cpu() - want.cpu()).abs() / want.cpu().abs().clamp(min=1e-30)).max()), 1e-5
        out.append(_run("ntk.alignment_partials", "triton", device, f"{M}x{N} symmetric={sym}", fn))
    return out


def _models() -> dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]]:
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 17), nn.ReLU(), nn.Linear(17, 9), nn.Tanh(), nn.Linear(9, 3)), \
            torch.randn(11, 3)

    def cnn():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2), nn.ReLU(),
                             nn.Flatten(), nn.Linear(4 * 3 * 3, 2)), torch.randn(6, 2, 8, 8)
    return {"mlp": mlp, "cnn": cnn}


def _check_engine(device: str, quick: bool) -> list[CheckResult]:
    """ntk_gram / ntk_alignment (every implementation, backend torch and triton) and the probes."""
    from .metrics import (kernel_alignment, ntk_alignment, ntk_gram, representation_alignment,
                          sign_similarity)

    out = []
    ntk_backends = [b for b in ("torch", "triton") if b in _backend.available(device)]
    for name, make in _models().items():
        m, x = make()
        m, x = m.to(device), x.to(device)
        m64 = copy.deepcopy(m).double()
        want = {kern: R.ntk_gram(m64, x.double(), kernel=kern) for kern in ("full", "trace")}
        m1 = copy.deepcopy(m)
        with torch.no_grad():
            for p in m1.parameters():
                p.mul_(1.1)
        for backend in ntk_backends:
            for impl in ("auto", "jacobian") if quick else ("auto", "layerwise", "jacobian", "naive"):
                for kern in ("full", "trace"):
                    for dtype in (torch.float64, torch.float32):
                        for bs, n in ((None, x.shape[0]), (4, x.shape[0]), (None, 1)):
                            if quick and bs == 4 and dtype == torch.float32:
                                continue

                            def fn(kern=kern, dtype=dtype, bs=bs, n=n, impl=impl, backend=backend):
                                got = ntk_gram(m, x[:n], kernel=kern, implementation=impl, dtype=dtype,
                                               block_size=bs, backend=backend)
                                ref = want[kern][:n, :, :n] if kern == "full" else want[kern][:n, :n]
                                scale = float(ref.abs().max())
                                tol = (1e-10 if dtype == torch.float64 else 1e-5) * scale
                                return float((got.double().cpu() - ref.cpu()).abs().max()), tol
                            case = f"{name} {kern} {impl} {str(dtype).removeprefix('torch.')} n={n} block={bs}"
                            out.append(_run("ntk_gram", backend, device, case, fn))
            for kern in ("full", "trace"):
                for centered in (False, True):
                    def fn(kern=kern, centered=centered, backend=backend):
                        got = ntk_alignment(m1, x, m, kernel=kern, centered=centered, block_size=4, backend=backend,
                                            dtype=torch.float64)
                        K = R.ntk_gram(copy.deepcopy(m1).double(), x.double(), kernel=kern)
                        return abs(got - R.kernel_alignment(K, want[kern], centered=centered)), 1e-10
                    out.append(_run("ntk_alignment", backend, device, f"{name} {kern} centered={centered} block=4",
                                    fn))
        if name == "mlp":
            for backend, skipped in _backends("sign_similarity", device):
                if skipped:
                    out.append(skipped)
                    continue

                def fn(backend=backend):
                    got = sign_similarity(m1, list(x.split(4)), m, backend=backend)
                    return abs(got - R.sign_similarity(m1, [x], m)), 1e-12
                out.append(_run("sign_similarity", backend, device, "mlp, batches of 4", fn))
            for centered in (False, True):
                def fn(centered=centered):
                    got = representation_alignment(m1, list(x.split(4)), m, centered=centered, dtype=torch.float64)
                    return abs(got - R.representation_alignment(m1, [x], m, centered=centered)), 1e-6
                out.append(_run("representation_alignment", "torch", device, f"mlp centered={centered}", fn))
            K1, K2 = (R.ntk_gram(copy.deepcopy(mm).double(), x.double(), kernel="trace") for mm in (m1, m))

            def fn():
                return abs(kernel_alignment(K1, K2, centered=True) - R.kernel_alignment(K1, K2, centered=True)), 1e-12
            out.append(_run("kernel_alignment", "torch", device, "[n, n] centered", fn))
    return out


def run_checks(device: str = "all", quick: bool = False) -> list[CheckResult]:
    """Every check on `device`: each op on each backend that can run there, against the reference.

    Args:
        device: `"cpu"`, `"cuda"` or `"all"`.
        quick: fewer and smaller cases.

    Returns:
        One [CheckResult][lazyhasty.check.CheckResult] per case (skipped backends included).

    Raises:
        ValueError: an unknown `device`.
    """
    results: list[CheckResult] = []
    for dev in _devices(device):
        with exact_fp32():
            results += _check_signs(dev, quick)
            results += _check_triton_ntk(dev, quick)
            results += _check_engine(dev, quick)
    return results


def format_table(results: list[CheckResult], show_all: bool = True) -> str:
    """The table of `results`, one row per case, then the totals.

    Args:
        results: from [run_checks][lazyhasty.check.run_checks].
        show_all: every row (else only the rows that are not ok).

    Returns:
        The table as text.
    """
    head = ("op", "backend", "device", "case", "max error", "tolerance", "time", "status")
    rows = [head]
    for r in results if show_all else [r for r in results if r.status != "ok"]:
        rows.append((r.op, r.backend, r.device, r.case,
                     "-" if r.max_error is None else f"{r.max_error:.2e}",
                     "-" if r.tolerance is None else f"{r.tolerance:.1e}",
                     f"{r.seconds * 1e3:.1f} ms", r.status + (f" ({r.note})" if r.note else "")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * min(160, len(lines[0])))
    n_bad = sum(r.status in ("FAIL", "error") for r in results)
    n_ok = sum(r.status == "ok" for r in results)
    n_skip = sum(r.status == "skipped" for r in results)
    lines.append(f"\n{n_ok} ok, {n_bad} failed, {n_skip} backends skipped")
    return "\n".join(lines)


def main(device: str, quick: bool, json_path: str | None = None, show_all: bool = True) -> int:
    """`lazyhasty check`: run the checks, print the table, optionally write them as JSON.

    Args:
        device: `"cpu"`, `"cuda"` or `"all"`.
        quick: fewer and smaller cases.
        json_path: also write the backends' summary and every result there.
        show_all: print every row (else only the rows that are not ok).

    Returns:
        The exit status: 1 when any case mismatched or raised, else 0.
    """
    results = run_checks(device, quick)
    print(format_table(results, show_all))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"backends": _backend.summary(), "results": [dataclasses.asdict(r) for r in results]}, f,
                      indent=1)
    return 1 if any(r.status in ("FAIL", "error") for r in results) else 0
