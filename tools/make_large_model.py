"""Make an FP32 ONNX model over 2 GB (weights as external data) to check the >2 GB path by hand.

    python tools/make_large_model.py /tmp/large/large.onnx --gib 2.2
    onnx-mixquant /tmp/large/large.onnx /tmp/large/large_w4.onnx --dim N=1

The graph is x[N, D] -> MatMul(W0) -> Relu -> MatMul(W1) -> ... with square D x D weights; the
weights go to ``<name>.data`` beside the model, as any exporter of a >2 GB model must do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx_ir as ir


def build(dim: int, layers: int, seed: int) -> ir.Model:
    """A MatMul/Relu chain with ``layers`` weights of shape (dim, dim), normal(0, 1/sqrt(dim))."""
    rng = np.random.default_rng(seed)
    x = ir.Value(name="x", shape=ir.Shape(["N", dim]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], name="large", opset_imports={"": 17})
    h = x
    for i in range(layers):
        w = (rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)
        wv = ir.Value(
            name=f"W{i}",
            const_value=ir.tensor(w, name=f"W{i}"),
            shape=ir.Shape([dim, dim]),
            type=ir.TensorType(ir.DataType.FLOAT),
        )
        graph.register_initializer(wv)
        mm = ir.node("MatMul", [h, wv], name=f"matmul{i}")
        graph.append(mm)
        h = mm.outputs[0]
        if i < layers - 1:
            relu = ir.node("Relu", [h], name=f"relu{i}")
            graph.append(relu)
            h = relu.outputs[0]
    h.name = "y"
    h.type = ir.TensorType(ir.DataType.FLOAT)
    h.shape = ir.Shape(["N", dim])
    graph.outputs.append(h)
    return ir.Model(graph, ir_version=8, producer_name="onnx-mixquant tools/make_large_model.py")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--gib", type=float, default=2.2, help="total weight size in GiB")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dim = int(np.sqrt(args.gib * 2**30 / 4 / args.layers))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ir.save(build(dim, args.layers, args.seed), args.out, external_data=f"{args.out.name}.data")
    size = sum(p.stat().st_size for p in args.out.parent.glob(f"{args.out.name}*"))
    print(f"wrote {args.out} (+ .data): {args.layers} weights of {dim}x{dim}, {size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
