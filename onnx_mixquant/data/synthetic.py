"""Synthetic validation inputs for a model given without data.

A model exported by someone else declares symbolic dims (``batch``, ``sequence``), unnamed ones
(``?``, ``-1``) and integer inputs that index tables (token ids, segment ids) or gate the model
(attention masks). Random validation inputs must respect all of that, or onnxruntime refuses them
(ids out of range) or the comparison is meaningless (a mask of random zeros). This stage:

1. gives every dim a value: ``dims`` by dim name or by ``INPUT:AXIS`` first, else a default by
   role (:data:`DEFAULT_BATCH` for axis 0 and ``batch``-like names, :data:`DEFAULT_SEQUENCE` for
   sequence-like dims and the last axis of integer inputs, :data:`DEFAULT_IMAGE` for the spatial
   axes of a rank-4 float input, :data:`DEFAULT_OTHER` elsewhere); dims sharing a name share a value;
2. gives every input a value rule from the graph: integer inputs that reach a ``Gather`` as its
   indices (through Cast / Unsqueeze / Reshape ...) are drawn in ``[0, rows)`` of the smallest such
   table; inputs named like a mask are all ones; ``position``-named inputs count 0, 1, 2 ...; other
   integers are small non-negative values, floats standard normal, bools random;
3. checks that the FP model runs on one such sample; when it does not and some dims were
   defaulted, tries :data:`FALLBACK_SIZES` for those dims, and gives up with a reason (the caller
   then skips validation with a warning and still writes the model after a load check).

Such inputs say whether the quantized model computes the same function on *some* inputs, not on
the inputs it will see: results on them are marked indicative (``Samples.synthetic``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnx_mixquant.errors import ConfigError
from onnx_mixquant.read import ModelInput
from onnx_mixquant.session import CPU, first_line, open_session
from onnx_mixquant.validate import Samples

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_IMAGE",
    "DEFAULT_OTHER",
    "DEFAULT_SEQUENCE",
    "DefaultDim",
    "InputRule",
    "SyntheticInputs",
    "plan_inputs",
    "synthetic_samples",
]

logger = logging.getLogger(__name__)

#: Axis 0 and dims named like a batch.
DEFAULT_BATCH = 1
#: Sequence-like dims (names with seq / len / token / time, the last axis of an integer input).
DEFAULT_SEQUENCE = 128
#: Height and width of a rank-4 float input (NCHW or NHWC).
DEFAULT_IMAGE = 224
#: Any other symbolic dim.
DEFAULT_OTHER = 16
#: Values tried in turn for the defaulted non-batch dims when the FP model rejects the defaults.
FALLBACK_SIZES = (32, 64, 256, 8, 1)
#: Integer inputs with no table to index are drawn from [0, _INT_HIGH).
_INT_HIGH = 10
_UNNAMED = ("", "?")
_BATCH_NAMES = re.compile(r"^(n|b|bs|batch.*|.*_batch|.*batch_size|num_.*)$", re.IGNORECASE)
_SEQ_NAMES = re.compile(r"(seq|len|token|time|step|frames?$|^t$|^s$)", re.IGNORECASE)
_SPATIAL_NAMES = re.compile(r"^(h|w|height|width|.*_h|.*_w|.*height|.*width)$", re.IGNORECASE)
#: Ops an index input passes through unchanged in value on its way to a Gather.
_PASS_THROUGH = frozenset({"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand"})


@dataclass(frozen=True)
class InputRule:
    """How the values of one input are drawn.

    kind: "float" (standard normal), "index" (uniform in [0, high)), "mask" (all ones / True),
    "position" (0, 1, 2 ... along the last axis, below ``high`` when set), "int" (uniform in
    [0, high)), "bool" (random).
    """

    kind: str
    high: int | None = None
    why: str = ""


@dataclass(frozen=True)
class DefaultDim:
    """A dim the user did not give: where it is, its name (None when unnamed), the value chosen
    and why ("batch", "image", "sequence", "other": defaults by role; "fallback": a size tried
    after the FP model rejected the defaults)."""

    input: str
    pos: int
    name: str | None
    value: int
    role: str

    def describe(self) -> str:
        """E.g. "input 'x' dim 2 ('height'): 224 (image default)"."""
        label = "unnamed" if self.name is None else repr(self.name)
        why = "fallback" if self.role == "fallback" else f"{self.role} default"
        return f"input {self.input!r} dim {self.pos} ({label}): {self.value} ({why})"


@dataclass(frozen=True)
class SyntheticInputs:
    """Concrete shapes and value rules for every input, and the dims chosen without the user."""

    shapes: Mapping[str, tuple[int, ...]]
    rules: Mapping[str, InputRule]
    #: Every dim not given by the user (a dim name shared by several inputs is listed once).
    defaulted: tuple[DefaultDim, ...] = ()

    @property
    def chosen(self) -> tuple[str, ...]:
        """How each defaulted dim was chosen, one line each."""
        return tuple(d.describe() for d in self.defaulted)

    @property
    def guessed(self) -> tuple[str, ...]:
        """The lines of :attr:`chosen` for dims other than the batch (worth a warning)."""
        return tuple(d.describe() for d in self.defaulted if d.role != "batch")


def _is_unnamed(dim: object) -> bool:
    return dim is None or dim in _UNNAMED or (isinstance(dim, int) and dim < 0)


def _np_dtype(inp: ModelInput) -> np.dtype:
    dtype = None
    if inp.dtype not in _UNNAMED:  # np.dtype("?") would be bool
        try:
            dtype = np.dtype(inp.dtype)
        except TypeError:
            pass
    if dtype is None or dtype.kind not in "fiub":
        what = "unknown element type" if inp.dtype in _UNNAMED else f"element type {inp.dtype!r}"
        raise ConfigError(f"input {inp.name!r}: cannot make random samples of {what}; give data (--samples)")
    return dtype


def _role(inp: ModelInput, pos: int, dim: int | str, kind: str, sequence: int) -> tuple[int, str]:
    """Default value of one free dim, and its role."""
    name = "" if _is_unnamed(dim) else str(dim)
    rank = len(inp.dims)
    if pos == 0 or _BATCH_NAMES.match(name):
        return DEFAULT_BATCH, "batch"
    if _SPATIAL_NAMES.match(name) or (kind == "f" and rank == 4 and _spatial_axis(inp, pos)):
        return DEFAULT_IMAGE, "image"
    if _SEQ_NAMES.search(name) or (kind in "iu" and pos == rank - 1):
        return sequence, "sequence"
    return DEFAULT_OTHER, "other"


def _spatial_axis(inp: ModelInput, pos: int) -> bool:
    """Axis 2/3 of NCHW (axis 1 a small fixed channel count), or 1/2 of NHWC (axis 3 small)."""
    c1, c3 = inp.dims[1], inp.dims[3]
    if isinstance(c1, int) and 0 < c1 <= 4:
        return pos in (2, 3)
    if isinstance(c3, int) and 0 < c3 <= 4:
        return pos in (1, 2)
    return pos in (2, 3)


def _given(dims: Mapping[str, int], inp: ModelInput, pos: int, d: int | str) -> int | None:
    """The user's value for this dim: ``INPUT:AXIS`` first, then the dim's name."""
    by_pos = dims.get(f"{inp.name}:{pos}")
    if by_pos is not None:
        return by_pos
    if not _is_unnamed(d) and str(d) in dims:
        return dims[str(d)]
    return None


def _gather_rows(value: ir.Value) -> int | None:
    """Rows of the smallest constant table that ``value`` indexes (through pass-through ops)."""
    best: int | None = None
    todo, seen = [value], set()
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node, idx in v.uses():
            if node.op_type in _PASS_THROUGH and idx == 0 and node.outputs:
                todo.append(node.outputs[0])
            elif node.op_type == "Gather" and idx == 1:
                table = node.inputs[0]
                axis = node.attributes.get_int("axis", 0)
                if table is not None and table.shape is not None and table.const_value is not None:
                    rows = table.shape[axis]
                    if isinstance(rows, int) and rows > 0:
                        best = rows if best is None else min(best, rows)
    return best


def _rule(inp: ModelInput, dtype: np.dtype, value: ir.Value | None) -> InputRule:
    lowered = inp.name.lower()
    if dtype.kind == "f":
        return InputRule("float")
    if "mask" in lowered:
        return InputRule("mask", why="named like a mask: all ones")
    if dtype.kind == "b":
        return InputRule("bool")
    rows = _gather_rows(value) if value is not None else None
    if "position" in lowered:
        return InputRule("position", rows, "named like positions: 0, 1, 2 ...")
    if rows is not None:
        return InputRule("index", rows, f"indexes a table of {rows} rows")
    return InputRule("int", _INT_HIGH, f"no table found: small values in [0, {_INT_HIGH})")


def plan_inputs(
    inputs: Sequence[ModelInput],
    model: ir.Model | None,
    dims: Mapping[str, int] | None = None,
    sequence: int = DEFAULT_SEQUENCE,
) -> SyntheticInputs:
    """Shapes (user values, else defaults by role) and value rules for every input.

    Raises:
        ConfigError: an input whose element type cannot be drawn (strings, unknown).
    """
    dims = dict(dims or {})
    values = {v.name: v for v in model.graph.inputs} if model is not None else {}
    named: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    rules: dict[str, InputRule] = {}
    defaulted: list[DefaultDim] = []
    for inp in inputs:
        dtype = _np_dtype(inp)
        rules[inp.name] = _rule(inp, dtype, values.get(inp.name))
        shape = []
        for pos, d in enumerate(inp.dims):
            if isinstance(d, int) and d >= 0:
                shape.append(d)
                continue
            given = _given(dims, inp, pos, d)
            if given is None and not _is_unnamed(d) and str(d) in named:
                given = named[str(d)]
            if given is None:
                given, role = _role(inp, pos, d, dtype.kind, sequence)
                name = None if _is_unnamed(d) else str(d)
                defaulted.append(DefaultDim(inp.name, pos, name, given, role))
            if not _is_unnamed(d):
                named.setdefault(str(d), given)
            shape.append(given)
        shapes[inp.name] = tuple(shape)
    _warn_unused(dims, inputs)
    return SyntheticInputs(shapes, rules, tuple(defaulted))


def _warn_unused(dims: Mapping[str, int], inputs: Sequence[ModelInput]) -> None:
    known = {str(d) for inp in inputs for d in inp.dims if not isinstance(d, int) and not _is_unnamed(d)}
    known |= {f"{inp.name}:{p}" for inp in inputs for p in range(len(inp.dims))}
    unused = sorted(set(dims) - known)
    if unused:
        logger.warning("dimension values not used by any model input: %s", ", ".join(unused))


def _draw(rng: np.random.Generator, inp: ModelInput, rule: InputRule, shape: tuple[int, ...]) -> np.ndarray:
    dtype = _np_dtype(inp)
    if rule.kind == "float":
        return np.asarray(rng.standard_normal(shape), dtype=dtype)
    if rule.kind == "mask":
        return np.ones(shape, dtype=dtype)
    if rule.kind == "bool":
        return np.asarray(rng.random(shape) < 0.5)
    if rule.kind == "position":
        last = shape[-1] if shape else 1
        pos = np.arange(last) % rule.high if rule.high else np.arange(last)
        return np.ascontiguousarray(np.broadcast_to(pos, shape).astype(dtype))
    return np.asarray(rng.integers(0, rule.high or _INT_HIGH, size=shape), dtype=dtype)


def _feeds(inputs: Sequence[ModelInput], plan: SyntheticInputs, num: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {i.name: _draw(rng, i, plan.rules[i.name], plan.shapes[i.name]) for i in inputs} for _ in range(num)
    ]


def _with_size(plan: SyntheticInputs, inputs: Sequence[ModelInput], size: int) -> SyntheticInputs:
    """The plan with every defaulted non-batch dim set to ``size`` (in every input that shares
    its name)."""
    moved = [d for d in plan.defaulted if d.role != "batch"]
    names = {d.name for d in moved if d.name is not None}
    places = {(d.input, d.pos) for d in moved}
    shapes = {}
    for inp in inputs:
        shape = list(plan.shapes[inp.name])
        for pos, d in enumerate(inp.dims):
            if (inp.name, pos) in places or (not _is_unnamed(d) and str(d) in names):
                shape[pos] = size
        shapes[inp.name] = tuple(shape)
    defaulted = tuple(
        d if d.role == "batch" else replace(d, value=size, role="fallback") for d in plan.defaulted
    )
    return SyntheticInputs(shapes, plan.rules, defaulted)


def synthetic_samples(
    fp_path: Path,
    inputs: Sequence[ModelInput],
    model: ir.Model | None,
    dims: Mapping[str, int] | None,
    num: int,
    seed: int,
    sequence: int = DEFAULT_SEQUENCE,
) -> tuple[Samples | None, SyntheticInputs, str | None]:
    """``num`` synthetic feeds the FP model accepts, the plan they follow, and (when no plan
    runs) why validation on synthetic inputs is impossible: ``(None, plan, reason)``.
    ``sequence``: the default of sequence-like dims (the sensitivity probe uses a shorter one).

    Raises:
        ConfigError: ``num`` below 1, or an input whose element type cannot be drawn.
    """
    if num < 1:
        raise ConfigError(f"number of random samples must be >= 1, got {num!r}")
    plan = plan_inputs(inputs, model, dims, sequence)
    candidates = [plan]
    if plan.guessed:
        candidates += [_with_size(plan, inputs, s) for s in FALLBACK_SIZES]
    try:
        sess = open_session(fp_path, CPU, "ORT_ENABLE_BASIC", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    except Exception as e:
        return None, plan, f"onnxruntime cannot open the FP model: {first_line(e)}"
    error = ""
    for cand in candidates:
        feeds = _feeds(inputs, cand, num, seed)
        try:
            sess.run(None, feeds[0])
        except Exception as e:
            error = error or first_line(e)
            logger.info("synthetic inputs %s rejected: %s", dict(cand.shapes), first_line(e))
            continue
        for line in cand.chosen:
            logger.info("synthetic input %s", line)
        source = f"random (seed {seed}; indicative only)"
        return Samples(feeds=tuple(feeds), labels=None, source=source, synthetic=True), cand, None
    return None, plan, f"the FP model rejects synthetic inputs of shapes {dict(plan.shapes)}: {error}"
