"""Alignment sums formed so that nothing large cancels: error-free float64 sums and products.

Centred alignments are small differences of large sums: for kernels dominated by a constant or a
rank-one part (a large bias, inputs clustered around one point, weight-normalised layers) the centred
kernel ``H K H`` can be 1e-4 of ``K``, and its squared norm 1e-8 of ``|K|_F^2``. One-pass centring
``sum K_t K_0 - (2/n) sum r_t r_0 + S_t S_0 / n^2`` then loses 8 of float64's 16 digits. Rather than a
second pass over the tiles (twice the NTK cost), every sum here is kept as an unevaluated pair
``hi + lo`` ("double-double") whose error is ~1e-32 relative to the terms summed:

- sums: Rump's error-free extraction. With ``sigma = 2^ceil(log2(m max|x|))``, ``q = (sigma + x) - sigma``
  keeps the high bits of every ``x`` as multiples of ``ulp(sigma)``: their sum is exact in any order
  (every partial sum is a multiple of ``ulp(sigma)`` below ``sigma``), and the remainders ``x - q``
  (exact, each below ``ulp(sigma)``) are summed plainly. Three elementwise operations and two plain sums.
- products: float32 x float32 is exact in float64 (48 significant bits); float64 products use Dekker's
  ``TwoProduct`` (no fused multiply-add is needed).

The centred sum is then formed as ``n^2 P - 2 n Q + T`` in double-double (scaling by integers is exact),
rounded once at the end. Measured in tests/test_alignment_exact.py against rational arithmetic.
"""
from __future__ import annotations

import math
import warnings

import torch

F64 = torch.float64
_SPLITTER = 134217729.0  # 2^27 + 1 (Dekker)


def _scalar_zero(device) -> torch.Tensor:
    return torch.zeros((), dtype=F64, device=device)


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a + b = s + e`` exactly (Knuth), elementwise float64."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a * b = p + e`` exactly (Dekker, no FMA), elementwise float64 (|a|, |b| < 1e290)."""
    p = a * b
    c = _SPLITTER * a
    ah = c - (c - a)
    al = a - ah
    c = _SPLITTER * b
    bh = c - (c - b)
    bl = b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _sigma(m: int, bound: float) -> float:
    """A power of two >= 2 m bound: multiples of its ulp below it add exactly in float64."""
    return math.ldexp(1.0, math.frexp(m * bound)[1] + 1)


def exact_sum(x: torch.Tensor, dim: int | None = None, *, bound: float | None = None,
              inplace: bool = False, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum(x)`` (over ``dim``, or all) of a float64 tensor as ``(hi, lo)``.

    Two extraction levels, then a plain sum of what is left (each value below ``(2 m)^2 2^-106 max|x|``):
    the error is below ``~(2m)^4 2^-159 max|x|``, i.e. ~1e-23 of ``max|x|`` for a million terms.
    bound: a known ``>= max|x|`` (saves a pass); inplace: ``x`` may be overwritten (it becomes the
    remainders); scratch: a float64 buffer of ``x``'s size for the extracted parts.
    """
    m = x.numel() if dim is None else x.shape[dim]

    def total(t):
        return t.sum() if dim is None else t.sum(dim)

    if x.numel() == 0:
        z = total(x)
        return z, torch.zeros_like(z)
    if bound is None:
        bound = float(x.abs().max())
    if bound == 0.0 or not math.isfinite(bound):
        s = total(x)
        return s, torch.zeros_like(s)
    r = x if inplace else x.clone()
    q = torch.empty_like(r) if scratch is None else scratch.view(r.shape)
    hi = lo = None
    sigma = _sigma(m, bound)
    for _ in range(2):
        torch.add(r, sigma, out=q)
        q.sub_(sigma)  # high bits of every value: multiples of ulp(sigma), their sum is exact
        r.sub_(q)  # exact remainders, each below ulp(sigma) / 2
        if hi is None:
            hi = total(q)
            lo = torch.zeros_like(hi)
        else:
            hi, e = two_sum(hi, total(q))
            lo = lo + e
        sigma = _sigma(m, math.ldexp(sigma, -53))
    return two_sum(hi, lo + total(r))


def exact_dot(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum(a * b)`` of same-shape tensors as ``(hi, lo)``; products exact (see module docstring)."""
    if a.dtype in (torch.float32, torch.float16, torch.bfloat16) and b.dtype in (
            torch.float32, torch.float16, torch.bfloat16):
        return exact_sum(a.to(F64) * b.to(F64), inplace=True)  # <= 48 significant bits: exact in float64
    p, e = two_prod(a.to(F64), b.to(F64))
    hi, lo = exact_sum(p, inplace=True)
    return hi, lo + e.sum()


class DD:
    """A float64 double-double scalar or tensor ``hi + lo`` with the few operations the sums need."""

    __slots__ = ("hi", "lo")

    def __init__(self, hi: torch.Tensor, lo: torch.Tensor | None = None):
        self.hi = hi
        self.lo = torch.zeros_like(hi) if lo is None else lo

    @classmethod
    def zeros(cls, shape, device) -> "DD":
        return cls(torch.zeros(shape, dtype=F64, device=device))

    def add_(self, hi: torch.Tensor, lo: torch.Tensor | None = None, index=None) -> "DD":
        """In place ``self[index] += hi + lo``."""
        if index is None:
            s, e = two_sum(self.hi, hi)
            self.hi, self.lo = s, self.lo + e + (0.0 if lo is None else lo)
        else:
            s, e = two_sum(self.hi[index], hi)
            self.hi[index] = s
            self.lo[index] += e + (0.0 if lo is None else lo)
        return self

    def __add__(self, other: "DD") -> "DD":
        s, e = two_sum(self.hi, other.hi)
        return DD(s, e + self.lo + other.lo)

    def scale(self, c: float) -> "DD":
        """``c * self`` for an exactly representable ``c`` (integers up to 2^53)."""
        p, e = two_prod(self.hi, torch.full_like(self.hi, c))
        return DD(p, e + self.lo * c)

    def dot(self, other: "DD") -> "DD":
        """``sum(self * other)`` over all elements."""
        p, e = two_prod(self.hi, other.hi)
        hi, lo = exact_sum(p)
        return DD(hi, lo + (e + self.hi * other.lo + self.lo * other.hi).sum())

    def __sub__(self, other: "DD") -> "DD":
        s, e = two_sum(self.hi, -other.hi)
        return DD(s, e + self.lo - other.lo)

    def div(self, m: int) -> "DD":
        """``self / m`` for a positive integer ``m`` (one correction step: error ~eps^2)."""
        q = self.hi / m
        p, e = two_prod(q, torch.full_like(q, float(m)))
        return DD(q, ((self.hi - p) - e + self.lo) / m)

    def value_tensor(self) -> torch.Tensor:
        return self.hi + self.lo

    def total(self, dim: int | None = None) -> "DD":
        hi, lo = exact_sum(self.hi, dim)
        return DD(hi, lo + (self.lo.sum() if dim is None else self.lo.sum(dim)))

    def value(self) -> float:
        return float(self.hi) + float(self.lo)


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


# A centred kernel below this many units of the inputs' rounding (relative to the uncentred one) is zero
# to working precision: all examples carry the same kernel row up to rounding (one example, duplicates).
ZERO_ULPS = 32.0
# Warn when the kernel values' own rounding (eps / (|HKH| / |K|)) limits a centred alignment beyond this.
ACCURACY_WARN = 1e-4


def ratio(cross: float, norm_a: float, norm_b: float, what: str, *, lower: float = -1.0) -> float:
    """``cross / (norm_a norm_b)`` with the shared NaN / zero-norm errors, clamped to ``[lower, 1]``.

    ``|<A, B>| <= |A| |B|`` (Cauchy-Schwarz) and ``<A, B> >= 0`` for PSD ``A, B`` (``lower=0``): the
    clamp removes only the last bits of rounding, never a real excess (the sums are exact to ~1e-30).
    """
    cross, norm_a, norm_b = float(cross), float(norm_a), float(norm_b)
    if any(v != v for v in (cross, norm_a, norm_b)):
        raise ValueError(f"NaN in {what}: alignment is undefined")
    if norm_a == 0.0 or norm_b == 0.0:
        raise ValueError(f"{what} has zero Frobenius norm (e.g. all units dead): alignment is undefined")
    return min(1.0, max(lower, cross / (norm_a * norm_b)))


def check_centred(centred_sq: float, plain_sq: float, eps: float, what: str, n: int) -> None:
    """Refuse a centred kernel that is zero to working precision; warn when float32 rounding limits it.

    centred_sq, plain_sq: ``|HKH|_F^2`` and ``|K|_F^2``; eps: the unit roundoff of the kernel's values.
    """
    if n < 2:
        raise ValueError(f"{what}: the centred alignment of a single example is undefined (H K H = 0)")
    rel = math.sqrt(max(centred_sq, 0.0) / plain_sq) if plain_sq > 0 else 0.0
    hint = " (its values were rounded in float32: compute in float64, e.g. dtype=torch.float64, to resolve it)" \
        if eps > 1e-10 else ""
    if rel <= ZERO_ULPS * eps:
        raise ValueError(
            f"{what}: the centred kernel is zero to working precision (|HKH|_F / |K|_F = {rel:.2g} <= "
            f"{ZERO_ULPS * eps:.2g}): every example has the same kernel row up to rounding (one example, "
            f"identical inputs, or a kernel dominated by a constant){hint}; the centred alignment is undefined")
    if eps / rel > ACCURACY_WARN:
        warnings.warn(
            f"{what}: the centred kernel is {rel:.1e} of the uncentred one; kernel values rounded at {eps:.1e} "
            f"limit the centred alignment to about {eps / rel:.0e}{hint}", RuntimeWarning, stacklevel=3)


class AlignmentSums:
    """Sums for ``KA(K_t, K_0)`` (and its centred form) accumulated tile by tile, exactly.

    The kernels are taken as symmetric: a diagonal tile that is symmetric only up to rounding is centred
    as ``(K + K^T) / 2`` (``sum A B`` differs from that of the symmetric parts by ~eps^2 |A| |B|).

    Tiles ``[bi, bj]`` (``kernel="trace"``) or ``[bi, k, bj, k]`` (``"full"``; ``"diagonal"`` blocks are
    ``[b, k, k]`` and never centred) of two symmetric kernels; ``add`` takes the tile at rows ``si``,
    columns ``sj`` and, when ``off_diagonal``, also stands for its mirror image at ``(sj, si)``.
    Centring over examples (``H K H`` per output pair ``(a, b)``) uses row sums ``R`` and totals ``S``::

        sum (H A H)(H B H) = [n^2 sum A B - 2 n sum_i R_A[i] R_B[i] + sum_ab S_A S_B] / n^2
    """

    def __init__(self, n: int, k: int, kernel: str, centered: bool, device):
        self.n, self.kernel, self.centered = n, kernel, centered
        self.cross, self.sq_t, self.sq_0 = (DD(_scalar_zero(device)) for _ in range(3))
        self.eps = 0.0
        self.lower = 0.0  # NTKs are PSD: Tr[A B] >= 0 (kernel_alignment of any symmetric matrices: -1)
        self._ws: dict[str, torch.Tensor] = {}
        if centered:
            shape = (n, k, k) if kernel == "full" else (n,)
            self.R_t, self.R_0 = DD.zeros(shape, device), DD.zeros(shape, device)

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        # reused float64 workspaces: fresh tile-sized buffers cost more in page faults than the arithmetic
        buf = self._ws.get(name)
        if buf is None or buf.numel() < like.numel() or buf.device != like.device:
            buf = self._ws[name] = torch.empty(like.numel(), dtype=F64, device=like.device)
        return buf[:like.numel()].view(like.shape)

    def add(self, Kt: torch.Tensor, K0: torch.Tensor, si: slice, sj: slice, off_diagonal: bool) -> None:
        self.eps = max(self.eps, _eps(Kt.dtype), _eps(K0.dtype))
        w = 2.0 if off_diagonal else 1.0
        A = self._buffer("a", Kt).copy_(Kt)  # exact (float32 -> float64)
        B = self._buffer("b", K0).copy_(K0)
        if not self.centered:
            # float64 dots: products of float32 values are exact, and without centring nothing cancels
            # beyond |sum a b| <= |A|_F |B|_F (Cauchy-Schwarz): the ratio is accurate to ~1e-16 * log(m)
            a, b = A.reshape(-1), B.reshape(-1)
            for acc, (x, y) in ((self.cross, (a, b)), (self.sq_t, (a, a)), (self.sq_0, (b, b))):
                acc.add_(w * torch.dot(x, y))
            return
        amax = {"a": float(A.abs().max()), "b": float(B.abs().max())}
        P, Q = self._buffer("p", A), self._buffer("q", A)
        two_prod_needed = Kt.dtype == F64 or K0.dtype == F64
        for acc, (x, y, bx, by) in ((self.cross, (A, B, "a", "b")), (self.sq_t, (A, A, "a", "a")),
                                    (self.sq_0, (B, B, "b", "b"))):
            if two_prod_needed:
                p, e = two_prod(x, y)
                P.copy_(p)
                err = e.sum()
            else:
                torch.mul(x, y, out=P)  # exact
                err = 0.0
            hi, lo = exact_sum(P, bound=amax[bx] * amax[by], inplace=True, scratch=Q)
            acc.add_(w * hi, w * (lo + err))  # w = 2: exact
        full = self.kernel == "full"
        for K, R, name in ((A, self.R_t, "a"), (B, self.R_0, "b")):
            cols = exact_sum(P.copy_(K), 0, bound=amax[name], inplace=True, scratch=Q)
            rows = exact_sum(K, 2 if full else 1, bound=amax[name], inplace=True, scratch=Q)
            if full:  # [k(a), bj, k(b)] -> [j, b, a] (K[i,a,j,b] = K[j,b,i,a])
                cols = tuple(c.permute(1, 2, 0) for c in cols)
            if off_diagonal:
                R.add_(*rows, index=si)
                R.add_(*cols, index=sj)
            else:
                # a diagonal tile is symmetric only up to its GEMM's rounding: centre the symmetric
                # kernel (K + K^T) / 2, whose row sums are the mean of K's row and column sums (exact)
                s, e = two_sum(rows[0], cols[0])
                R.add_(0.5 * s, 0.5 * (e + rows[1] + cols[1]), index=si)

    def add_partials(self, parts: torch.Tensor, w: float) -> None:
        """Partial sums ``(cross, sq_t, sq_0)`` of a tile reduced elsewhere (the fused Triton kernel)."""
        parts = parts.to(self.cross.hi.device, F64)
        self.eps = max(self.eps, _eps(torch.float32))
        for i, acc in enumerate((self.cross, self.sq_t, self.sq_0)):
            acc.add_(w * parts[i])

    def _centred(self, Ra: DD, Rb: DD, plain: DD) -> DD:
        n = self.n
        Sa, Sb = Ra.total(0), Rb.total(0)
        return plain.scale(float(n * n)) + Ra.dot(Rb).scale(-2.0 * n) + Sa.dot(Sb)

    def alignment(self, what: str = "the tangent kernel") -> float:
        if not self.centered:
            return ratio(self.cross.value(), max(self.sq_t.value(), 0.0) ** 0.5, max(self.sq_0.value(), 0.0) ** 0.5,
                         what, lower=self.lower)
        n2 = float(self.n) ** 2
        cross = self._centred(self.R_t, self.R_0, self.cross).value() / n2
        st = self._centred(self.R_t, self.R_t, self.sq_t).value() / n2
        s0 = self._centred(self.R_0, self.R_0, self.sq_0).value() / n2
        for c, p, which in ((st, self.sq_t.value(), "model"), (s0, self.sq_0.value(), "reference")):
            check_centred(c, p, self.eps, f"{what} ({which})", self.n)
        return ratio(cross, st ** 0.5, s0 ** 0.5, what, lower=self.lower)


class CentredMoments:
    """Streamed second moments of two feature sets ``Phi_a [n, da]``, ``Phi_b [n, db]``, exact for any batching.

    Uncentred: ``A = sum phi_a phi_a^T`` etc. (per-batch GEMMs in the compute dtype, sums in float64).
    Centred: co-moments about the running mean, merged batch by batch (Chan, Golub & LeVeque 1979):
    each batch is centred on its own mean before its GEMM, and two partial results combine as
    ``C = C_1 + C_2 + (m_1 - m_2)(m_1 - m_2)^T n_1 n_2 / n`` -- no large sum minus a large correction.
    The means are double-double (exact sums), so ``m_1 - m_2`` keeps its digits however large the mean.
    """

    def __init__(self, centered: bool, dtype: torch.dtype | None, check_bytes):
        self.centered, self.dtype, self.check_bytes = centered, dtype, check_bytes
        self.n = 0
        self.aa = self.bb = self.ab = None
        self.sum_a = self.sum_b = None  # DD feature sums (centred only)
        self.plain_a = self.plain_b = None  # |Phi|_F^2 (float64 tensors), for the "zero to working precision" test
        self.eps = 0.0
        self._pending: list = []
        self._pending_rows = 0

    # small batches are gathered up to this many rows first: each merge costs O(d^2) whatever the batch
    CHUNK_ROWS = 256

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"batch sizes differ: {a.shape[0]} vs {b.shape[0]}")
        if a.shape[0] == 0:
            return
        if a.shape[0] >= self.CHUNK_ROWS and not self._pending:
            self._merge(a, b)
            return
        self._pending.append((a, b))
        self._pending_rows += a.shape[0]
        if self._pending_rows >= self.CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            pa, pb = zip(*self._pending)
            if len({t.shape[1:] for t in pa}) > 1 or len({t.shape[1:] for t in pb}) > 1:
                raise ValueError("the representation size changed between batches")
            self._pending, self._pending_rows = [], 0
            self._merge(torch.cat(pa), torch.cat(pb))

    def _merge(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.aa is None:
            self.check_bytes(a.shape[1], b.shape[1])
        elif a.shape[1] != self.aa.shape[0] or b.shape[1] != self.bb.shape[0]:
            raise ValueError("the representation size changed between batches")
        self.eps = max(self.eps, _eps(a.dtype), _eps(b.dtype))
        cd = self.dtype or (F64 if F64 in (a.dtype, b.dtype) else torch.float32)
        a64, b64 = a.to(F64), b.to(F64)
        pa, pb = (a64 * a64).sum(), (b64 * b64).sum()
        self.plain_a = pa if self.plain_a is None else self.plain_a + pa
        self.plain_b = pb if self.plain_b is None else self.plain_b + pb
        m = a.shape[0]
        if self.centered:
            sa, sb = DD(*exact_sum(a64, 0)), DD(*exact_sum(b64, 0))
            ma, mb = sa.div(m), sb.div(m)
            # small values: the GEMM's rounding is relative to them
            a64, b64 = (a64 - ma.hi) - ma.lo, (b64 - mb.hi) - mb.lo
        ac, bc = a64.to(cd), b64.to(cd)
        aa, bb, ab = (ac.T @ ac).to(F64), (bc.T @ bc).to(F64), (ac.T @ bc).to(F64)
        if self.aa is None:
            self.aa, self.bb, self.ab = aa, bb, ab
            if self.centered:
                self.sum_a, self.sum_b = sa, sb
            self.n = m
            return
        if self.centered:
            n1 = self.n
            w = n1 * m / (n1 + m)
            da = (self.sum_a.div(n1) - ma).value_tensor()
            db = (self.sum_b.div(n1) - mb).value_tensor()
            aa += w * torch.outer(da, da)
            bb += w * torch.outer(db, db)
            ab += w * torch.outer(da, db)
            self.sum_a, self.sum_b = self.sum_a + sa, self.sum_b + sb
        self.aa += aa
        self.bb += bb
        self.ab += ab
        self.n += m

    def state(self) -> dict | None:
        """What another process needs to merge these moments (CPU tensors), or None when no example was added."""
        self._flush()
        if self.aa is None:
            return None
        cpu = (lambda t: None if t is None else t.detach().cpu())  # noqa: E731
        return {"n": self.n, "aa": cpu(self.aa), "bb": cpu(self.bb), "ab": cpu(self.ab), "eps": self.eps,
                "plain_a": cpu(self.plain_a), "plain_b": cpu(self.plain_b),
                "sum_a": None if self.sum_a is None else (cpu(self.sum_a.hi), cpu(self.sum_a.lo)),
                "sum_b": None if self.sum_b is None else (cpu(self.sum_b.hi), cpu(self.sum_b.lo))}

    def merge_states(self, states: list, device) -> None:
        """Replace these moments by the merge of ``states`` (from :meth:`state`, in rank order; None: a rank
        without examples): sums, and for centred moments Chan's pairwise update, as between batches."""
        self.aa = None
        self.n = 0
        for st in states:
            if st is None:
                continue
            dev = (lambda t: t.to(device))  # noqa: E731
            aa, bb, ab = dev(st["aa"]), dev(st["bb"]), dev(st["ab"])
            self.eps = max(self.eps, st["eps"])
            if self.aa is None:
                self.aa, self.bb, self.ab, self.n = aa, bb, ab, st["n"]
                self.plain_a, self.plain_b = dev(st["plain_a"]), dev(st["plain_b"])
                if self.centered:
                    self.sum_a, self.sum_b = DD(*map(dev, st["sum_a"])), DD(*map(dev, st["sum_b"]))
                continue
            m = st["n"]
            if self.centered:
                sa, sb = DD(*map(dev, st["sum_a"])), DD(*map(dev, st["sum_b"]))
                n1 = self.n
                w = n1 * m / (n1 + m)
                da = (self.sum_a.div(n1) - sa.div(m)).value_tensor()
                db = (self.sum_b.div(n1) - sb.div(m)).value_tensor()
                aa = aa + w * torch.outer(da, da)
                bb = bb + w * torch.outer(db, db)
                ab = ab + w * torch.outer(da, db)
                self.sum_a, self.sum_b = self.sum_a + sa, self.sum_b + sb
            self.aa, self.bb, self.ab = self.aa + aa, self.bb + bb, self.ab + ab
            self.plain_a, self.plain_b = self.plain_a + dev(st["plain_a"]), self.plain_b + dev(st["plain_b"])
            self.n += m

    def alignment(self, what: str = "the representation Gram", gram: str = "examples") -> float:
        """KA of the two feature sets' Gram matrices.

        gram="examples": the ``n x n`` Grams ``Phi Phi^T`` (the paper's definition), via
        ``Tr[K_a K_b] = |Phi_a^T Phi_b|_F^2``; "features": the ``d x d`` Grams ``Phi^T Phi`` (what the
        authors' code computed; needs ``d_a = d_b``), ``Tr[A B] / (|A|_F |B|_F)``.
        """
        self._flush()
        if gram not in ("examples", "features"):
            raise ValueError(f"gram must be 'examples' or 'features', got {gram!r}")
        if self.aa is None:
            raise ValueError("the probe set is empty: alignment is undefined")
        aa2, bb2 = float((self.aa * self.aa).sum()), float((self.bb * self.bb).sum())
        if self.centered:
            if self.n < 2:
                raise ValueError(f"{what}: the centred alignment of a single example is undefined (H K H = 0)")
            # |Phi_c|_F / |Phi|_F: features equal up to rounding have centred parts ~eps of themselves
            for tr, plain, which in ((float(self.aa.trace()), float(self.plain_a), "model"),
                                     (float(self.bb.trace()), float(self.plain_b), "reference")):
                rel = math.sqrt(max(tr, 0.0) / plain) if plain > 0 else 0.0
                if rel <= ZERO_ULPS * self.eps:
                    raise ValueError(
                        f"{what} ({which}): the centred features are zero to working precision "
                        f"(|Phi - mean|_F / |Phi|_F = {rel:.2g}): every example has the same representation "
                        "(identical inputs, one example, a constant layer): the centred alignment is undefined")
        if gram == "features":
            if self.aa.shape != self.bb.shape:
                raise ValueError(f"gram='features' needs features of the same size, got {self.aa.shape[0]} and "
                                 f"{self.bb.shape[0]}")
            cross = float((self.aa * self.bb).sum())
            return ratio(cross, aa2 ** 0.5, bb2 ** 0.5, what, lower=0.0)
        cross = float((self.ab * self.ab).sum())
        return ratio(cross, aa2 ** 0.5, bb2 ** 0.5, what, lower=0.0)
