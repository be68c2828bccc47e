"""How a profile scales with the input shape: a new (batch, sequence) planned without profiling it.

`ShapeFit` holds the profiles of one model measured at several input shapes (batch b, sequence
s) and predicts the `Profile` at a shape it has not seen, so the runtime can plan that shape
with zero profiling steps. It is told about ordinary steps too: every step counts each saved
storage's bytes exactly, and those counts correct the fit (units: bytes, seconds).

Rule 1 (bytes are pinned down, never guessed). The bytes of one saved storage (and the bytes of
one segment's inputs) are a sum of a few of the terms 1, b, s, b*s, s^2, b*s^2: activations
grow with b*s, an unfused attention's probabilities and dropout masks with b*s^2 (the quadratic
term of DESIGN.md §5, 5*a*s^2*b), a causal mask with s^2, parameters not at all. Each quantity
is fitted by the fewest terms (at most `MAX_TERMS`) that reproduce every shape seen within
`BYTES_RTOL`, with more shapes than terms, so the data confirm the model: two shapes pin down
a one-term quantity (the usual case, the quadratic one included), three a two-term one. Where
several models of that size reproduce the data (with one batch size seen, b*s and s are one
term), a shape is predicted only where they all agree: a new batch size needs a second batch
size seen. At a shape it has seen, the fit returns the bytes measured there.
Rule 2 (times and working sets are smooth). Forward and backward times and backward working
sets are measured only on profiling steps (an ordinary step is never synchronized for them);
each is a least-squares fit with non-negative coefficients (`nnls`). Times: on 1 and b*s (two
shapes), plus b*s^2 (three or more: attention's compute is quadratic in s, fused or not).
Working sets: on 1 and the segment's own saved bytes at that shape (its backward allocates the
gradients of its activations, an unfused attention's quadratic term included), so two shapes
carry the quadratic term too. On the tiny GPT fitted at 64 and 48 tokens it errs high, on the
safe side of the budget: +3% (blocks) and +17% (head) at 32 tokens, +10% and +25% at 16.
Rule 3 (one structure). A fit holds profiles with the same segments and the same saved
storages (by pack index). A profile of another structure (the model took another path at
this shape) starts the fit again from it.
Rule 4 (bounded). At most `max_shapes` shapes are held; the oldest goes first.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Sequence

from .profile import Profile, SegmentRecord, TensorRecord

log = logging.getLogger(__name__)

TERMS = ("1", "b", "s", "bs", "s2", "bs2")
MAX_TERMS = 3  # terms one exact quantity may use
BYTES_RTOL = 1e-3  # an exact model must reproduce each shape's bytes this closely (relative)
SMOOTH_TERMS = ("1", "bs", "bs2")  # times, in the order they join the fit
MAX_SHAPES = 64


def term(name: str, batch: int, seq: int) -> float:
    """The value of one of `TERMS` at (batch, seq)."""
    b, s = float(batch), float(seq)
    return {"1": 1.0, "b": b, "s": s, "bs": b * s, "s2": s * s, "bs2": b * s * s}[name]


def lstsq(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float] | None:
    """Least-squares coefficients of `rows` (one per point) against `ys`; None when the columns
    are (numerically) dependent. Normal equations on columns scaled to unit maximum."""
    n = len(rows[0]) if rows else 0
    if n == 0 or len(rows) < n:
        return None
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(n)]
    a = [[sum(r[i] * r[j] for r in rows) / (scale[i] * scale[j]) for j in range(n)]
         + [sum(r[i] * y for r, y in zip(rows, ys)) / scale[i]] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda i: abs(a[i][col]))
        if abs(a[pivot][col]) < 1e-9 * len(rows):
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for i in range(n):
            if i != col:
                f = a[i][col] / a[col][col]
                a[i] = [x - f * y for x, y in zip(a[i], a[col])]
    return [a[i][n] / a[i][i] / scale[i] for i in range(n)]


@dataclass(frozen=True)
class Model:
    """A sum of `TERMS` with coefficients: value(b, s) = sum coef * term(b, s)."""

    terms: tuple[str, ...]
    coefs: tuple[float, ...]

    def __call__(self, batch: int, seq: int) -> float:
        return sum(c * term(t, batch, seq) for t, c in zip(self.terms, self.coefs))


def exact_models(points: Sequence[tuple[int, int, float]]) -> tuple[Model, ...]:
    """Rule 1: the models with the fewest terms (fewer than the points) that reproduce every
    point (batch, seq, value) within `BYTES_RTOL`; empty when none does."""
    for size in range(1, min(MAX_TERMS, len(points) - 1) + 1):
        found = []
        for terms in itertools.combinations(TERMS, size):
            rows = [[term(t, b, s) for t in terms] for b, s, _ in points]
            coefs = lstsq(rows, [y for _, _, y in points])
            if coefs is None:
                continue
            model = Model(terms, tuple(coefs))
            if all(abs(model(b, s) - y) <= 0.5 + BYTES_RTOL * abs(y) for b, s, y in points):
                found.append(model)
        if found:
            return tuple(found)
    return ()


def agreed(models: Sequence[Model], batch: int, seq: int) -> int | None:
    """The bytes every model predicts at (batch, seq), or None when they disagree (or there are
    none, or the value is negative)."""
    values = [m(batch, seq) for m in models]
    if not values:
        return None
    lo, hi = min(values), max(values)
    if hi - lo > 0.5 + BYTES_RTOL * abs(hi) or lo < -0.5:
        return None
    return max(0, round((lo + hi) / 2))


def nnls(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> tuple[float, ...]:
    """Least squares with non-negative coefficients, one per column of `rows` (0 for a column
    left out): of the subsets of columns whose own fit has no negative coefficient, the one
    with the least residual (the smaller on a tie). All zeros when none has."""
    n = len(rows[0]) if rows else 0
    best: tuple[float, tuple[float, ...]] | None = None
    for size in range(1, n + 1):
        for cols in itertools.combinations(range(n), size):
            coefs = lstsq([[r[c] for c in cols] for r in rows], ys)
            if coefs is None or any(c < 0 for c in coefs):
                continue
            full = [0.0] * n
            for c, x in zip(cols, coefs):
                full[c] = x
            err = sum((sum(a * x for a, x in zip(r, full)) - y) ** 2 for r, y in zip(rows, ys))
            if best is None or err < best[0] * (1 - 1e-9):
                best = (err, tuple(full))
    return best[1] if best is not None else (0.0,) * n


def smooth_model(points: Sequence[tuple[int, int, float]]) -> Model:
    """Rule 2 for times: `nnls` on the first 1, 2 or 3 of `SMOOTH_TERMS` (one point: b*s)."""
    k = len(points)
    basis = ("bs",) if k == 1 else SMOOTH_TERMS[:min(k, len(SMOOTH_TERMS))]
    coefs = nnls([[term(t, b, s) for t in basis] for b, s, _ in points], [y for _, _, y in points])
    return Model(basis, coefs)


@dataclass
class _Seen:
    """What one shape measured: exact bytes always, times and working sets when profiled."""

    tensors: tuple[int, ...]  # nbytes per tensor, in the fit's tensor order
    offloadable: tuple[bool, ...]
    inputs: tuple[int, ...]  # input bytes per segment
    forward_s: list[float] | None = None  # mean over the profiles of this shape
    backward_s: list[float] | None = None
    timed: int = 0  # profiles averaged into the times
    worksets: tuple[int, ...] | None = None


@dataclass
class ShapeFit:
    """Profiles of one model at several input shapes, and the profile predicted at another."""

    max_shapes: int = MAX_SHAPES
    _structure: tuple | None = field(default=None, repr=False)
    _template: Profile | None = field(default=None, repr=False)
    _seen: dict[tuple[int, int], _Seen] = field(default_factory=dict, repr=False)
    _exact: dict[tuple, tuple[Model, ...]] = field(default_factory=dict, repr=False)  # ys -> models

    @staticmethod
    def structure(profile: Profile) -> tuple:
        """Rule 3: what two profiles must share to be fitted together."""
        return (tuple((s.name, s.recomputable) for s in profile.segments),
                tuple((t.id, t.segment, t.last) for t in profile.tensors))

    @property
    def shapes(self) -> int:
        """Distinct shapes seen (profiled or measured on ordinary steps)."""
        return len(self._seen)

    @property
    def timed_shapes(self) -> int:
        """Distinct shapes profiled (with times)."""
        return sum(1 for v in self._seen.values() if v.timed)

    def add(self, batch: int, seq: int, profile: Profile, *, timed: bool) -> bool:
        """Add what a step at (batch, seq) measured: its bytes, and with `timed` its segment
        times and working sets (a profiling step). False when the profile's structure differs
        from the fit's: the fit then starts again from this profile (Rule 3)."""
        fresh = self._structure is None
        same = self.structure(profile) == self._structure
        if not same:
            if not fresh:
                log.info("shape fit: the step at batch %d, sequence %d saved other tensors than the "
                         "%d shape(s) fitted; fitting again from it", batch, seq, len(self._seen))
            self._structure, self._seen = self.structure(profile), {}
        self._template = profile
        key = (batch, seq)
        old = self._seen.get(key)
        seen = _Seen(tensors=tuple(t.nbytes for t in profile.tensors),
                     offloadable=tuple(t.offloadable for t in profile.tensors),
                     inputs=tuple(s.input_bytes for s in profile.segments))
        if old is not None:
            seen.forward_s, seen.backward_s, seen.timed, seen.worksets = (
                old.forward_s, old.backward_s, old.timed, old.worksets)
        if timed:
            fwd = [s.forward_s for s in profile.segments]
            bwd = [s.backward_s for s in profile.segments]
            if seen.timed:
                n = seen.timed
                fwd = [(a * n + x) / (n + 1) for a, x in zip(seen.forward_s, fwd)]
                bwd = [(a * n + x) / (n + 1) for a, x in zip(seen.backward_s, bwd)]
            seen.forward_s, seen.backward_s, seen.timed = fwd, bwd, seen.timed + 1
            if profile.has_working_sets:
                seen.worksets = tuple(s.backward_working_set_bytes for s in profile.segments)
        if old is None or old.tensors != seen.tensors or old.inputs != seen.inputs:
            self._exact.clear()
        self._seen[key] = seen
        while len(self._seen) > self.max_shapes:
            del self._seen[next(iter(self._seen))]
            self._exact.clear()
        return same or fresh

    def predict(self, batch: int, seq: int, *, signature: str = "",
                min_offload_bytes: int = 0) -> Profile | None:
        """The profile at (batch, seq), or None while the shapes seen do not pin down every
        saved storage's bytes there (Rule 1) or none was profiled. A storage predicted below
        `min_offload_bytes`, or never offloadable where measured, is not offloadable."""
        if self._template is None or not any(v.timed for v in self._seen.values()):
            return None
        shapes = list(self._seen)
        seen = self._seen.get((batch, seq))
        if seen is not None:
            nbytes, inputs, movable = seen.tensors, seen.inputs, seen.offloadable
        else:
            nbytes = self._pin([v.tensors for v in self._seen.values()], shapes, batch, seq)
            inputs = self._pin([v.inputs for v in self._seen.values()], shapes, batch, seq)
            if nbytes is None or inputs is None:
                return None
            movable = tuple(any(v.offloadable[i] for v in self._seen.values()) and n >= min_offload_bytes
                            for i, n in enumerate(nbytes))
        timed = [(k, v) for k, v in self._seen.items() if v.timed]
        measured = [(self._saved(v.tensors), v.worksets) for v in self._seen.values() if v.timed and v.worksets]
        saved = self._saved(nbytes)
        segments = []
        for j, s in enumerate(self._template.segments):
            fwd = smooth_model([(b, q, v.forward_s[j]) for (b, q), v in timed])(batch, seq)
            bwd = smooth_model([(b, q, v.backward_s[j]) for (b, q), v in timed])(batch, seq)
            ws = 0.0
            if measured:  # Rule 2: on 1 and the segment's saved bytes (one shape: those alone)
                rows = [[1.0, at[j]] if len(measured) > 1 else [0.0, at[j]] for at, _ in measured]
                coefs = nnls(rows, [w[j] for _, w in measured])
                ws = coefs[0] + coefs[1] * saved[j]
            segments.append(SegmentRecord(
                index=s.index, name=s.name, forward_s=max(0.0, fwd), backward_s=max(0.0, bwd),
                recomputable=s.recomputable, input_bytes=inputs[j],
                backward_working_set_bytes=max(0, round(ws))))
        tensors = tuple(TensorRecord(id=t.id, segment=t.segment, nbytes=n, offloadable=m,
                                     last_segment=t.last_segment)
                        for t, n, m in zip(self._template.tensors, nbytes, movable))
        p = self._template
        return Profile(segments=tuple(segments), tensors=tensors, bw_d2h=p.bw_d2h, bw_h2d=p.bw_h2d,
                       transfer_latency_s=p.transfer_latency_s, signature=signature,
                       meta={"fit": True, "batch": batch, "seq": seq, "shapes": len(shapes),
                             "timed_shapes": len(timed)})

    def _saved(self, nbytes: Sequence[int]) -> list[int]:
        """Bytes first saved in each segment, given every tensor's bytes."""
        out = [0] * len(self._template.segments)
        for t, n in zip(self._template.tensors, nbytes):
            out[t.segment] += n
        return out

    def _pin(self, columns: list[tuple[int, ...]], shapes: list[tuple[int, int]], batch: int,
             seq: int) -> tuple[int, ...] | None:
        """Rule 1 for every quantity of one kind (`columns`: per shape, a value per quantity)."""
        out = []
        for ys in zip(*columns):
            models = self._exact.get(ys)
            if models is None:
                models = self._exact[ys] = exact_models([(b, s, y) for (b, s), y in zip(shapes, ys)])
            value = agreed(models, batch, seq)
            if value is None:
                return None
            out.append(value)
        return tuple(out)
