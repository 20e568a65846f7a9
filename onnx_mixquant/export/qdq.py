"""Rewrite: replace each quantized weight by integer tensor -> DequantizeLinear, and save the model.

``insert_qdq`` mutates the model it is given (after an opset conversion, which builds a new model,
so always use the model it returns). ``stage_model`` writes the file into a temporary folder beside
the target; ``StagedModel.commit`` renames it into place, ``StagedModel.discard`` removes it, so a
failed run never leaves a half-written output.

Storage types (one table, ``storage_for``)::

    bits   asymmetric (unsigned)  symmetric (signed)  integer range used        min opset
    2      UINT4 (UINT2 opt.)     INT4 (INT2 opt.)    [0, 3] / [-2, 1]          21 (25)
    3      UINT4                  INT4                [0, 7] / [-4, 3]          21
    4      UINT4                  INT4                [0, 15] / [-8, 7]         21
    5..7   UINT8                  INT8                [0, 2^b-1] / +-2^(b-1)    13 (10 per-tensor)
    8      UINT8                  INT8                [0, 255] / [-128, 127]    13 (10 per-tensor)

A block-wise weight (``QParams.block_size``) gets DequantizeLinear attributes ``axis`` (the
blocked reduction axis) and ``block_size`` and 2-D scale / zero point: opset 21 at least.

With ``ExportConfig.pack_widths`` (the default), widths 2 (without INT2), 3, 5, 6 and 7 are
stored at their own width instead (``packs``): ``insert_qdq`` gives their DequantizeLinear an
8-bit (UINT8/INT8) input, so they need no opset 21, and ``pack_weights``, the last pass before
saving, replaces that input by a bit-packed uint8 initializer and standard ops that unpack it and
that onnxruntime folds at session creation (``_packing``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir

from onnx_mixquant.config import ExportConfig
from onnx_mixquant.errors import ExportError, UnsupportedModelError
from onnx_mixquant.export._packing import pack_model, packs
from onnx_mixquant.read import first_reader, weight_values
from onnx_mixquant.rounding import QuantizedWeight

__all__ = [
    "ExportResult",
    "StagedModel",
    "Storage",
    "insert_qdq",
    "pack_weights",
    "packs",
    "required_opset",
    "stage_model",
    "storage_for",
    "upgrade_opset",
]

logger = logging.getLogger(__name__)

#: First opset whose DequantizeLinear takes ``block_size`` (block-wise scales).
BLOCK_MIN_OPSET = 21

#: Highest default-domain opset the tool converts a model to.
MAX_TARGET_OPSET = 25


@dataclass(frozen=True)
class Storage:
    """ONNX integer type holding a width, and the opset that first allows it in DequantizeLinear."""

    dtype: ir.DataType
    numpy_dtype: type[np.integer]
    min_opset: int


@dataclass(frozen=True)
class ExportResult:
    """What the rewrite did: storage type per weight, opset before and after."""

    storage: Mapping[str, str]
    opset_before: int
    opset_after: int


def storage_for(bits: int, signed: bool, *, use_int2: bool, per_channel: bool) -> Storage:
    """The smallest ONNX integer type holding ``bits``-wide values (see the module table)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if bits == 2 and use_int2:
        return Storage(ir.DataType.INT2 if signed else ir.DataType.UINT2, np.int8 if signed else np.uint8, 25)
    if bits <= 4:
        return Storage(ir.DataType.INT4 if signed else ir.DataType.UINT4, np.int8 if signed else np.uint8, 21)
    return Storage(
        ir.DataType.INT8 if signed else ir.DataType.UINT8,
        np.int8 if signed else np.uint8,
        13 if per_channel else 10,
    )


def _storage(w: QuantizedWeight, cfg: ExportConfig) -> Storage:
    qp = w.qparams
    bits = 8 if packs(qp.bits, cfg) else qp.bits  # unpacked to 8-bit integers before the DQ
    st = storage_for(bits, qp.signed, use_int2=cfg.use_int2, per_channel=qp.axis is not None)
    if qp.block_size is not None and st.min_opset < BLOCK_MIN_OPSET:  # DQ's block_size attribute
        st = replace(st, min_opset=BLOCK_MIN_OPSET)
    return st


def default_opset(model: ir.Model) -> int:
    """The model's default-domain (ai.onnx) opset."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def required_opset(weights: Mapping[str, QuantizedWeight], cfg: ExportConfig) -> int:
    """Smallest default-domain opset whose DequantizeLinear accepts every storage type used."""
    return max((_storage(w, cfg).min_opset for w in weights.values()), default=1)


def upgrade_opset(model: ir.Model, target: int) -> ir.Model:
    """Convert ``model`` to default-domain opset ``target`` with onnx's version converter.

    Weight data stay out of the conversion (each initializer goes through as an external-data
    placeholder and is put back afterwards), so models over 2 GB convert too.

    Raises:
        ExportError: the converter cannot convert this model; the message says which opsets.
    """
    before = default_opset(model)
    originals: dict[str, ir.TensorProtocol] = {}
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            if value.const_value is not None:
                originals[name] = value.const_value
                value.const_value = ir.ExternalTensor(
                    location="__onnx_mixquant_placeholder__",
                    offset=0,
                    length=0,
                    dtype=value.const_value.dtype,
                    shape=ir.Shape(value.const_value.shape.numpy()),
                    name=name,
                )
    try:
        proto = ir.to_proto(model)
    finally:
        _restore(model, originals)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as e:  # the converter raises plain RuntimeError/ValueError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"cannot convert the model from opset {before} to opset {target}, which the chosen "
            f"integer types need: {first}. Choose widths of 5 bits or more (INT8 storage) or "
            f"convert the model yourself."
        ) from e
    new_model = ir.from_proto(converted)
    _restore(new_model, originals)
    logger.info("converted the model from opset %d to opset %d", before, target)
    return new_model


def _restore(model: ir.Model, tensors: Mapping[str, ir.TensorProtocol]) -> None:
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            if name in tensors:
                value.const_value = tensors[name]


def insert_qdq(
    model: ir.Model, weights: Mapping[str, QuantizedWeight], cfg: ExportConfig
) -> tuple[ir.Model, ExportResult]:
    """Replace every weight in ``weights`` by integer tensor -> DequantizeLinear (in place).

    Converts the opset first when a storage type needs a newer one (a new model is returned then).

    Raises:
        ExportError: the opset must change and ``cfg.allow_opset_upgrade`` is False, or the
            conversion fails.
    """
    before = default_opset(model)
    needed = required_opset(weights, cfg)
    if needed > before:
        if not cfg.allow_opset_upgrade:
            raise ExportError(
                f"the chosen integer types need opset {needed} but the model has opset {before} "
                f"and opset conversion is disabled (--no-opset-upgrade); allow it or use widths "
                f"of 5 bits or more"
            )
        if needed > MAX_TARGET_OPSET:
            raise UnsupportedModelError(f"opset {needed} is beyond what this tool writes")
        model = upgrade_opset(model, needed)
    values = weight_values(model)
    storage: dict[str, str] = {}
    for name in sorted(weights, key=list(values).index):
        w = weights[name]
        st = _storage(w, cfg)
        _replace_weight(values[name], w, st)
        storage[name] = st.dtype.name + _block_note(w)
    return model, ExportResult(storage=storage, opset_before=before, opset_after=max(before, needed))


def _replace_weight(value: ir.Value, w: QuantizedWeight, st: Storage) -> None:
    """Swap ``value`` (an initializer or a Constant output) for DequantizeLinear(q, scale, zp)."""
    qp = w.qparams
    name = w.name
    q_t = ir.tensor(w.q.astype(st.numpy_dtype), dtype=st.dtype, name=f"{name}_quantized")
    s_t = ir.tensor(np.asarray(qp.scale, dtype=np.float32), name=f"{name}_scale")
    z_t = ir.tensor(
        np.asarray(qp.zero_point).astype(st.numpy_dtype), dtype=st.dtype, name=f"{name}_zero_point"
    )
    attrs = {"axis": int(qp.axis)} if qp.axis is not None else {}
    if qp.block_size is not None:  # scale / zero point in the block layout (numerics.QParams)
        attrs["block_size"] = int(qp.block_size)
    producer = value.producer()
    if producer is not None:  # a Constant node: emit Constant nodes where it stood
        graph = producer.graph
        assert graph is not None
        consts = [ir.node("Constant", [], {"value": t}, name=f"{t.name}_Constant") for t in (q_t, s_t, z_t)]
        for c, t in zip(consts, (q_t, s_t, z_t), strict=True):
            c.outputs[0].name = t.name
        inputs = [c.outputs[0] for c in consts]
        anchor: ir.Node | None = producer
    else:
        graph = value.graph
        assert graph is not None
        inputs = []
        for t in (q_t, s_t, z_t):
            v = ir.Value(
                name=t.name,
                const_value=t,
                shape=ir.Shape(list(t.shape.numpy())),
                type=ir.TensorType(t.dtype),
            )
            graph.register_initializer(v)
            inputs.append(v)
        consts = []
        anchor = None
    dq = ir.node("DequantizeLinear", inputs, attrs, name=f"{name}_DequantizeLinear")
    out = dq.outputs[0]
    out.name = name
    out.shape = ir.Shape(list(w.q.shape))
    out.type = ir.TensorType(ir.DataType.FLOAT)
    new_nodes = [*consts, dq]
    if anchor is not None:
        graph.insert_after(anchor, new_nodes)
    else:
        first = first_reader(value)
        if first is None:
            graph.extend(new_nodes)
        else:
            graph.insert_before(first, new_nodes)
    ir.convenience.replace_all_uses_with(value, out, replace_graph_outputs=True)
    if anchor is not None:
        graph.remove(anchor, safe=True)
    else:
        graph.initializers.pop(name)


def pack_weights(
    model: ir.Model, weights: Mapping[str, QuantizedWeight], exported: ExportResult, cfg: ExportConfig
) -> ExportResult:
    """Store every weight of a packed width (``packs``) bit-packed; mutates ``model``.

    The last pass before saving: every earlier stage reads and writes the plain 8-bit integer
    initializers ``{name}_quantized``. Per graph, width and signedness, the weights' integers are
    concatenated in graph order and packed into one uint8 initializer; unpack ops placed at the
    start of that graph give back each weight's integers under the same name, so DequantizeLinear,
    its scale and zero point are unchanged (see ``_packing.pack_model``).

    Returns:
        ``exported`` with the storage of each packed weight as e.g. "UINT3 packed".
    """
    if not cfg.pack_widths:
        return exported
    packed = pack_model(model, weights, cfg, default_opset(model))
    packed = {n: text + _block_note(weights[n]) if n in weights else text for n, text in packed.items()}
    return replace(exported, storage={**exported.storage, **packed})


def _block_note(w: QuantizedWeight) -> str:
    """ " blk32" for a weight with block-wise scales (blocks of 32), else ""."""
    return f" blk{w.qparams.block_size}" if w.qparams.block_size is not None else ""


@dataclass
class StagedModel:
    """A saved model waiting in a temporary folder beside its destination."""

    path: Path
    destination: Path
    external_data: Path | None
    file_bytes: int
    _tmpdir: Path

    def commit(self) -> None:
        """Rename into place (external data first, then the model file)."""
        try:
            if self.external_data is not None:
                os.replace(self.external_data, self.destination.with_name(self.external_data.name))
            os.replace(self.path, self.destination)
        except OSError as e:
            raise ExportError(f"{self.destination}: cannot write: {e.strerror}") from e
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the temporary folder and whatever is left in it."""
        shutil.rmtree(self._tmpdir, ignore_errors=True)


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file (other spellings, symlinks and hard links included)."""
    a, b = Path(a).expanduser().absolute(), Path(b).expanduser().absolute()
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def check_destination(out_path: Path, input_path: Path) -> Path:
    """Resolve ``out_path`` and refuse the input file itself, a directory or an unwritable folder."""
    out = Path(out_path).expanduser().absolute()
    src = Path(input_path).expanduser().absolute()
    if same_file(out, src):
        raise ExportError(f"{out}: output path is the input model; refusing to overwrite it")
    if out.is_dir():
        raise ExportError(f"{out}: output path is a directory")
    if not out.parent.is_dir():
        raise ExportError(f"{out}: output folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ExportError(f"{out}: output folder {out.parent} is not writable")
    return out


def _tensor_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def stage_model(model: ir.Model, out_path: Path, input_path: Path, cfg: ExportConfig) -> StagedModel:
    """Save ``model`` into a temporary folder next to ``out_path`` (external data when large).

    Raises:
        ExportError: the destination is the input, a directory, or not writable.
    """
    out = check_destination(out_path, input_path)
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise ExportError(f"{out}: cannot write to {out.parent}: {e.strerror}") from e
    path = tmpdir / out.name
    external = _tensor_bytes(model) > cfg.external_data_threshold
    data_name = f"{out.name}.data" if external else None
    try:
        if data_name is not None:
            ir.save(model, path, external_data=data_name, size_threshold_bytes=1024)
        else:
            ir.save(model, path)
    except OSError as e:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise ExportError(f"{out}: cannot write: {e.strerror}") from e
    data_path = tmpdir / data_name if data_name is not None else None
    size = path.stat().st_size + (data_path.stat().st_size if data_path is not None else 0)
    return StagedModel(path=path, destination=out, external_data=data_path, file_bytes=size, _tmpdir=tmpdir)
