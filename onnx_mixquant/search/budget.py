"""MixQuant bit-width search: roundoff-error table -> one width per weight (a BitPlan).

NumPy only: this module imports no onnx, onnx_ir or onnxruntime.

Rules (``SearchConfig.rule``):

* ``QEM`` (Kloberdanz & Le, arXiv 2309.17341): with ``e_b`` the mean squared roundoff error of
  weight W at width b under the base quantizer, pick the smallest b with ``e_b <= QEM * ref``, where
  ``ref`` is ``min_b e_b`` of W itself (``QemReference.LAYER``, the per-layer reading) or the
  smallest 8-bit error of any weight in the model (``QemReference.MODEL``).
* ``BUDGET``: minimise ``sum_i e_i(b_i) / mean(W_i^2)`` (normalised error, i.e. 1/SQNR per weight)
  subject to ``sum_i n_i c(b_i) <= budget``, where c(b) is b for an average-bits target and the
  stored bytes for a byte target: the container (INT2/INT4/INT8 storage), or b bits per value
  for the widths the export bit-packs (``pack_widths``, mirroring ``ExportConfig.pack_widths``:
  2 without INT2, 3, 5, 6, 7; 8 values in b bytes), plus, for the widths quantized block-wise
  (``QuantizerConfig.block_size``), each block's float32 scale and zero point (in the integer
  type of the DequantizeLinear input). Solved by a Lagrangian relaxation
  (bisection on the multiplier) followed by a greedy fill of the remaining budget.
* ``UNIFORM``: every weight at one width (the baseline).

User overrides (pin a width, keep float) and "first and last layer at 8 bits" apply on top.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnx_mixquant.config import (
    QemReference,
    QuantizerConfig,
    SearchConfig,
    SearchRule,
)
from onnx_mixquant.errors import ConfigError
from onnx_mixquant.numerics import check_finite, roundoff_errors
from onnx_mixquant.rounding import grid_of

__all__ = [
    "BitPlan",
    "ErrorTable",
    "build_error_table",
    "container_bits",
    "search_bitwidths",
    "stored_bytes",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorTable:
    """Roundoff error of every weight at every candidate width.

    Attributes:
        names: weight names, in site order (n,).
        sizes: parameter count per weight, int64 (n,).
        bits: candidate widths (k,), ascending.
        mse: mean squared roundoff error, float64 (n, k).
        energy: mean(W^2) per weight, float64 (n,).
        blocks: scale / zero-point pairs per weight and width when that width is block-wise,
            else 0, int64 (n, k); None: no width is block-wise. They are priced in the byte
            budget and ``BitPlan.storage_bits`` (not in the nominal average bits).
    """

    names: tuple[str, ...]
    sizes: np.ndarray
    bits: tuple[int, ...]
    mse: np.ndarray
    energy: np.ndarray
    blocks: np.ndarray | None = None

    def scale_bits(self, i: int, b: int, use_int2: bool = False, pack_widths: bool = False) -> int:
        """Bits the block scales and zero points of weight ``i`` at width ``b`` take (0 for a
        width not in the table or not block-wise):
        32 per float32 scale plus the zero point in the DequantizeLinear input's integer type
        (e.g. 4 bits for UINT4: 4-bit weights in blocks of 32 cost 4 + 36/32 = 5.125 bits)."""
        if self.blocks is None or b not in self.bits or not self.blocks[i, self.bits.index(b)]:
            return 0
        packed = pack_widths and b in PACKED_WIDTHS and not (b == 2 and use_int2)
        zp = 8 if packed else container_bits(b, use_int2)  # packed widths are unpacked to 8 bits
        return int(self.blocks[i, self.bits.index(b)]) * (32 + zp)

    def normalised(self) -> np.ndarray:
        """mse / energy (relative error, 1/SQNR); 0 for an all-zero weight."""
        safe = np.where(self.energy > 0, self.energy, 1.0)
        return np.where(self.energy[:, None] > 0, self.mse / safe[:, None], 0.0)


@dataclass(frozen=True)
class BitPlan:
    """The chosen width per weight (None: kept in float) and why.

    Attributes:
        bits: weight name -> width or None.
        reasons: weight name -> short text ("budget rule", "pinned by --bits 'x'", ...).
        rule: the rule that chose the free widths.
        average_bits: parameter-weighted mean width over quantized weights.
        storage_bits: the same, priced at the bits each width is stored in: its own width when
            bit-packed, else its ONNX container (2/4/8 bits).
    """

    bits: Mapping[str, int | None]
    reasons: Mapping[str, str]
    rule: SearchRule
    average_bits: float
    storage_bits: float


#: Widths the export can store bit-packed at their own width (2 only without INT2).
PACKED_WIDTHS = (2, 3, 5, 6, 7)


def container_bits(bits: int, use_int2: bool = False, pack_widths: bool = False) -> int:
    """Bits one value of width ``bits`` occupies on disk: its own width when the export bit-packs
    it (``pack_widths``), else INT2 (opt.), INT4 or INT8 storage."""
    if pack_widths and bits in PACKED_WIDTHS and not (bits == 2 and use_int2):
        return bits
    if bits <= 2 and use_int2:
        return 2
    return 4 if bits <= 4 else 8


def stored_bytes(size: int, bits: int, use_int2: bool = False, pack_widths: bool = False) -> int:
    """Bytes the integers of a ``size``-value weight of width ``bits`` take in the file: groups of
    8 values in ``bits`` bytes when bit-packed, else whole bytes of the container."""
    c = container_bits(bits, use_int2, pack_widths)
    if c == bits and bits in PACKED_WIDTHS and pack_widths:
        return -(-size // 8) * bits
    return -(-size * c // 8)


def build_error_table(
    weights: Mapping[str, np.ndarray],
    axes: Mapping[str, int | None],
    quantizer: QuantizerConfig,
    bits: Sequence[int],
    progress: Callable[[int, int], None] | None = None,
    *,
    blocks: Mapping[str, int] | None = None,
) -> ErrorTable:
    """Compute ``e_b(W)`` for every weight and every width in ``bits`` under ``quantizer``.

    Args:
        weights: name -> float32 array, in site order.
        axes: name -> per-channel axis (None: per tensor regardless of the granularity).
        quantizer: the base quantizer the rounding stage will use.
        bits: candidate widths.
        progress: called as progress(done, total) after each weight.
        blocks: name -> reduction axis of the weights that may be block-wise
            (``rounding.block_axes``): each width gets the granularity the rounding stage will use
            for it (``rounding.grid_of``), block-wise at ``quantizer.block_at(b)``.

    Raises:
        UnsupportedModelError: a weight holds NaN or Inf.
    """
    bits = tuple(sorted(bits))
    names = tuple(weights)
    mse = np.zeros((len(names), len(bits)), dtype=np.float64)
    energy = np.zeros(len(names), dtype=np.float64)
    sizes = np.zeros(len(names), dtype=np.int64)
    n_blocks = np.zeros((len(names), len(bits)), dtype=np.int64)
    for i, name in enumerate(names):
        w = weights[name]
        check_finite(name, w)
        # one pass per grid and granularity (SYMMETRIC_INT8 and block_size mix them by width)
        passes: dict[tuple[bool, int | None, int | None], list[int]] = {}
        for j, b in enumerate(bits):
            axis, bs = grid_of(name, b, axes, blocks, quantizer)
            passes.setdefault((quantizer.symmetric_at(b), axis, bs), []).append(j)
            if bs is not None and axis is not None:
                n_blocks[i, j] = w.size // w.shape[axis] * -(-w.shape[axis] // bs)
        for (symmetric, axis, bs), cols in passes.items():
            mse[i, cols] = roundoff_errors(
                w,
                [bits[j] for j in cols],
                symmetric=symmetric,
                axis=axis,
                method=quantizer.scale_method,
                p=quantizer.mse_p,
                steps=quantizer.mse_steps,
                block_size=bs,
            )
        energy[i] = float(np.mean(np.square(w, dtype=np.float64))) if w.size else 0.0
        sizes[i] = w.size
        if progress is not None:
            progress(i + 1, len(names))
    blocked = n_blocks if n_blocks.any() else None
    return ErrorTable(names=names, sizes=sizes, bits=bits, mse=mse, energy=energy, blocks=blocked)


def _fixed_widths(
    table: ErrorTable, cfg: SearchConfig, aliases: Mapping[str, tuple[str, ...]]
) -> tuple[dict[str, int | None], dict[str, str]]:
    """Widths decided before the search: first/last at 8 bits, then user overrides (last wins)."""
    fixed: dict[str, int | None] = {}
    reasons: dict[str, str] = {}
    if cfg.first_last_8bit and table.names:
        for name in {table.names[0], table.names[-1]}:
            fixed[name] = 8
            reasons[name] = "first/last quantized layer kept at 8 bits"
    used = set()
    for name in table.names:
        keys = (name, *aliases.get(name, ()))
        for ov in cfg.overrides:
            if ov.matches(keys):
                fixed[name] = ov.bits
                used.add(ov.pattern)
                kind = "kept float by" if ov.bits is None else f"pinned to {ov.bits} bits by"
                reasons[name] = f"{kind} {ov.pattern!r}"
    for ov in cfg.overrides:
        if ov.pattern not in used:
            raise ConfigError(f"override {ov.pattern!r} matches no quantizable weight or node name")
    return fixed, reasons


def search_bitwidths(
    table: ErrorTable,
    cfg: SearchConfig,
    *,
    aliases: Mapping[str, tuple[str, ...]] | None = None,
    use_int2: bool = False,
    pack_widths: bool = False,
    objective: np.ndarray | None = None,
) -> BitPlan:
    """Choose a width for every weight in ``table`` by ``cfg.rule``.

    Args:
        table: the error table (its widths are the candidates).
        cfg: rule, its parameters and overrides.
        aliases: extra names an override may match per weight (its consumer nodes' names).
        use_int2: whether 2-bit weights are stored as INT2 (prices the byte budget).
        pack_widths: whether the export bit-packs widths 2 (without INT2), 3, 5, 6 and 7 at their
            own width (``ExportConfig.pack_widths``; prices the byte budget and ``storage_bits``).
        objective: what the budget rule minimises per weight and width, shaped like
            ``table.mse`` (e.g. measured output errors); None: the normalised roundoff error.

    Raises:
        ConfigError: an override matches nothing, or the budget cannot be met.
    """
    fixed, reasons = _fixed_widths(table, cfg, aliases or {})
    if cfg.rule is SearchRule.UNIFORM:
        chosen = {n: cfg.uniform_bits for n in table.names}
        why = f"uniform {cfg.uniform_bits} bits"
    elif cfg.rule is SearchRule.QEM:
        chosen = _qem_rule(table, cfg)
        why = f"QEM rule (qem={cfg.qem:g}, reference={cfg.qem_reference.value})"
    else:
        free = np.array([n not in fixed for n in table.names], dtype=bool)
        err = table.normalised() if objective is None else np.asarray(objective, dtype=np.float64)
        if err.shape != table.mse.shape or not np.all(np.isfinite(err)):
            raise ValueError(f"objective must be finite and shaped {table.mse.shape}, got {err.shape}")
        chosen = _budget_rule(table, cfg, fixed, free, (use_int2, pack_widths), err)
        why = "budget rule"
    bits: dict[str, int | None] = {}
    for n in table.names:
        bits[n] = fixed[n] if n in fixed else chosen[n]
        reasons.setdefault(n, why)
    avg, stored = _averages(table, bits, use_int2, pack_widths)
    logger.info("bit plan: %s, average %.3f bits (%.3f stored)", why, avg, stored)
    return BitPlan(bits=bits, reasons=reasons, rule=cfg.rule, average_bits=avg, storage_bits=stored)


def _averages(
    table: ErrorTable, bits: Mapping[str, int | None], use_int2: bool, pack_widths: bool
) -> tuple[float, float]:
    n = tot = stored = 0.0
    for i, (name, size) in enumerate(zip(table.names, table.sizes, strict=True)):
        b = bits[name]
        if b is not None:
            n += size
            tot += size * b
            stored += size * container_bits(b, use_int2, pack_widths)
            stored += table.scale_bits(i, b, use_int2, pack_widths)
    return (tot / n, stored / n) if n else (0.0, 0.0)


def _qem_rule(table: ErrorTable, cfg: SearchConfig) -> dict[str, int]:
    """Smallest width with e_b <= qem * reference (per-layer or model-wide reference)."""
    mse = table.mse
    if cfg.qem_reference is QemReference.LAYER:
        ref = mse.min(axis=1)
    else:
        col = table.bits.index(max(table.bits))
        ref = np.full(len(table.names), mse[:, col].min())
    ok = mse <= cfg.qem * ref[:, None] * (1 + 1e-12)
    out: dict[str, int] = {}
    for i, name in enumerate(table.names):
        hits = np.flatnonzero(ok[i])
        out[name] = table.bits[hits[0]] if hits.size else max(table.bits)
    return out


def _budget_rule(
    table: ErrorTable,
    cfg: SearchConfig,
    fixed: Mapping[str, int | None],
    free: np.ndarray,
    storage: tuple[bool, bool],
    err: np.ndarray,
) -> dict[str, int]:
    """Minimise the summed objective ``err`` (n, k) of the free weights under the budget;
    ``storage`` is (use_int2, pack_widths), which price a byte budget."""
    by_bytes = cfg.target_bytes is not None

    def price(i: int, b: int) -> float:
        size = int(table.sizes[i])
        if not by_bytes:
            return float(size * b)
        return float(stored_bytes(size, b, *storage)) + table.scale_bits(i, b, *storage) / 8

    cost = np.array([[price(i, b) for b in table.bits] for i in range(len(table.sizes))], dtype=np.float64)
    cost = cost.reshape(len(table.sizes), len(table.bits))  # (n, k), also when n == 0
    fixed_cost = 0.0
    quant_params = 0
    for i, name in enumerate(table.names):
        if name in fixed:
            b = fixed[name]
            if b is None:
                fixed_cost += 4.0 * table.sizes[i] if by_bytes else 0.0
            else:
                fixed_cost += price(i, b)
                quant_params += int(table.sizes[i])
        else:
            quant_params += int(table.sizes[i])
    if by_bytes:
        assert cfg.target_bytes is not None
        budget = cfg.target_bytes - fixed_cost
    else:
        assert cfg.target_bits is not None
        budget = cfg.target_bits * quant_params - fixed_cost
    idx = np.flatnonzero(free)
    if idx.size == 0:
        return {}
    choice = _allocate(err[idx], cost[idx], budget)
    if choice is None:
        lo = cost[idx].min(axis=1).sum() + fixed_cost
        what = f"{cfg.target_bytes} bytes" if by_bytes else f"{cfg.target_bits:g} average bits"
        need = f"{lo:.0f} bytes" if by_bytes else f"{lo / max(quant_params, 1):.3f} average bits"
        raise ConfigError(f"budget of {what} cannot be met: the smallest possible plan needs {need}")
    return {table.names[i]: table.bits[c] for i, c in zip(idx, choice, strict=True)}


def _allocate(err: np.ndarray, cost: np.ndarray, budget: float) -> np.ndarray | None:
    """Multiple-choice knapsack: one column per row, sum(cost) <= budget, small sum(err).

    Lagrangian: for multiplier lam each row takes argmin err + lam * cost; bisect lam (log scale)
    for the cheapest feasible plan, then upgrade greedily (best error drop per extra cost) while
    the budget allows. Returns column indices, or None when even the cheapest plan is over budget.
    """
    n = err.shape[0]
    rows = np.arange(n)
    cheapest = np.lexsort((err, cost), axis=1)[:, 0] if n else np.zeros(0, dtype=np.int64)
    if cost[rows, cheapest].sum() > budget * (1 + 1e-12):
        return None
    scale = max(float(err.max()), 1e-300) / max(float(cost.min()), 1e-300)

    def pick(lam: float) -> np.ndarray:
        return np.argmin(err + lam * cost + 1e-18 * cost, axis=1)

    lo, hi = -40.0, 40.0  # log10 of lam / scale
    best = cheapest
    for _ in range(200):
        mid = (lo + hi) / 2
        c = pick(scale * 10.0**mid)
        if cost[rows, c].sum() <= budget:
            best, hi = c, mid
        else:
            lo = mid
        if hi - lo < 1e-9:
            break
    return _greedy_fill(err, cost, best.copy(), budget)


def _greedy_fill(err: np.ndarray, cost: np.ndarray, choice: np.ndarray, budget: float) -> np.ndarray:
    """Spend what is left of the budget on the upgrades with the best error drop per cost."""
    rows = np.arange(err.shape[0])
    spent = cost[rows, choice].sum()
    while True:
        gain = err[rows, choice][:, None] - err  # (n, k): error removed by switching
        extra = cost - cost[rows, choice][:, None]
        ok = (gain > 0) & (extra <= budget - spent)
        if not ok.any():
            return choice
        ratio = np.where(ok, gain / np.where(extra > 0, extra, 1e-300), -np.inf)
        r, c = np.unravel_index(np.argmax(ratio), ratio.shape)
        spent += extra[r, c]
        choice[r] = c
