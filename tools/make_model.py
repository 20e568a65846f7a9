"""Train the small digits CNN used by the README demo and the end-to-end tests, export it to ONNX.

Dev-only script: it needs torch and scikit-learn, which the ``onnx_mixquant`` package never
imports. Make the environment once and run it from the repository root::

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0 scikit-learn onnx==1.23.2 onnxruntime numpy
    /work/torchvenv/bin/python tools/make_model.py

(options: ``--out-dir models --seed 0 --epochs 40``). It writes into ``--out-dir``:

* ``digits_cnn.onnx``: opset 17, input ``input`` float32 (N,1,8,8), output ``logits`` float32
  (N,10), batch dimension named ``N``.
* ``digits_test.npz``: the held-out split, ``input`` float32 (n,1,8,8) already normalised as
  the model expects (pixel / 16, so in [0, 1]) and ``labels`` int64 (n,).
* ``README.md``: what the model is, how it was made, and its FP32 accuracy on the held-out
  split measured with onnxruntime.

Data: scikit-learn's ``load_digits()`` (1797 8x8 images with pixels 0..16, shipped inside the
scikit-learn package, nothing downloaded), split 70/30 stratified with ``--seed``. Training is
deterministic: seeded, one thread, ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

MODEL_FILE = "digits_cnn.onnx"
TEST_FILE = "digits_test.npz"
CALIB_FILE = "digits_calib.npz"
#: Training images written as calibration data (a seeded sample of the training split).
CALIB_COUNT = 256
README_FILE = "README.md"
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "N"
TEST_FRACTION = 0.3
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
DEFAULT_EPOCHS = 40
#: Pixels of load_digits() are integer counts 0..16; the model takes pixel / PIXEL_SCALE.
PIXEL_SCALE = 16.0
MIN_ACCURACY = 0.97
COMMAND = "/work/torchvenv/bin/python tools/make_model.py"


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with an identity skip: ``relu(x + conv_b(relu(conv_a(x))))``."""

    def __init__(self, channels: int) -> None:
        """Build the block.

        Args:
            channels: Input and output channel count.
        """
        super().__init__()
        self.conv_a = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv_b = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Activations (N, C, H, W).

        Returns:
            Activations of the same shape.
        """
        return torch.relu(x + self.conv_b(torch.relu(self.conv_a(x))))


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digits with varied layer kinds for the bit-width search.

    Conv(1->16) -> Conv(16->32) -> residual block (two Conv 32->32, Add) -> MaxPool 2 ->
    Flatten -> Linear(512->64) (exported as Gemm) -> ``x @ W + b`` (64->10, exported as MatMul
    with a constant weight followed by Add). ReLU after every layer but the last.
    """

    def __init__(self) -> None:
        """Build the layers with torch's default initialisation (seed torch first)."""
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.res = ResidualBlock(32)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        bound = 1.0 / 64**0.5  # same uniform range nn.Linear(64, 10) would use
        self.head_W = nn.Parameter(torch.empty(64, 10).uniform_(-bound, bound))
        self.head_b = nn.Parameter(torch.empty(10).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Args:
            x: Normalised images (N, 1, 8, 8) float32, pixel / 16.

        Returns:
            Logits (N, 10).
        """
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.res(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        return x @ self.head_W + self.head_b


@dataclass(frozen=True)
class Split:
    """The seeded stratified split: normalised images (n,1,8,8) float32 and labels (n,) int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def seed_everything(seed: int) -> None:
    """Make torch and numpy deterministic and single-threaded.

    Args:
        seed: Seed for torch and numpy.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - nothing here draws from it, but keep it fixed anyway
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)


def load_split(seed: int) -> Split:
    """Load scikit-learn's digits, normalise them and split 70/30 stratified.

    Args:
        seed: ``random_state`` of the split.

    Returns:
        The split, images already divided by :data:`PIXEL_SCALE`.
    """
    digits = load_digits()
    images = (digits.images.astype(np.float32) / np.float32(PIXEL_SCALE))[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    return Split(
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
    )


def train(model: DigitsCNN, split: Split, epochs: int, seed: int) -> None:
    """Train ``model`` in place with Adam and cross-entropy.

    Args:
        model: The network, freshly initialised.
        split: Training data.
        epochs: Passes over the training set.
        seed: Seed of the shuffling generator.
    """
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:3d}/{epochs}: train loss {total / len(x):.4f}")
    model.eval()


def torch_logits(model: DigitsCNN, images: np.ndarray) -> np.ndarray:
    """Run ``model`` in eval mode.

    Args:
        model: The trained network.
        images: Normalised images (n,1,8,8) float32.

    Returns:
        Logits (n, 10) float32.
    """
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def export_onnx(model: DigitsCNN, path: Path) -> onnx.ModelProto:
    """Export with the TorchScript exporter, check the graph and write it with inferred shapes.

    Args:
        model: The trained network, in eval mode.
        path: Where to write the .onnx file.

    Returns:
        The model as written.

    Raises:
        RuntimeError: If the exported graph is not the expected one.
    """
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            # dynamo=False is deliberate: the TorchScript exporter gives Gemm/MatMul as asked.
            warnings.filterwarnings("ignore", "You are using the legacy", DeprecationWarning)
            torch.onnx.export(
                model,
                (torch.zeros(2, 1, 8, 8),),
                str(raw_path),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
                do_constant_folding=True,
            )
        proto = onnx.load(str(raw_path))
    for node in proto.graph.node:
        node.ClearField("doc_string")
    proto.doc_string = "Digits CNN (scikit-learn load_digits); input is pixel / 16. " + COMMAND
    onnx.checker.check_model(proto, full_check=True)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    check_graph(proto)
    onnx.save(proto, str(path))
    return proto


def check_graph(proto: onnx.ModelProto) -> None:
    """Check the things the tests rely on: names, dynamic batch, weight sites, no stray inputs.

    Args:
        proto: The exported, shape-inferred model.

    Raises:
        RuntimeError: On any mismatch.
    """
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    problems: list[str] = []
    if [i.name for i in graph.input] != [INPUT_NAME]:
        problems.append(f"graph inputs {[i.name for i in graph.input]}")
    if [o.name for o in graph.output] != [OUTPUT_NAME]:
        problems.append(f"graph outputs {[o.name for o in graph.output]}")
    for value, want in ((graph.input[0], [BATCH_DIM, 1, 8, 8]), (graph.output[0], [BATCH_DIM, 10])):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        if dims != want:
            problems.append(f"{value.name} shape {dims} != {want}")
    ops = collections.Counter(n.op_type for n in graph.node)
    want_ops = {"Conv": 4, "Relu": 5, "Add": 2, "MaxPool": 1, "Flatten": 1, "Gemm": 1, "MatMul": 1}
    if dict(ops) != want_ops:
        problems.append(f"op counts {dict(ops)} != {want_ops}")
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] not in inits:
            problems.append(f"MatMul {node.name} weight {node.input[1]} is not an initializer")
        if node.op_type in ("Conv", "Gemm") and node.input[1] not in inits:
            problems.append(f"{node.op_type} {node.name} weight is not an initializer")
    if problems:
        raise RuntimeError("unexpected exported graph: " + "; ".join(problems))


def ort_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """Run the ONNX model with onnxruntime on CPU, graph optimisations fully enabled.

    Args:
        path: The .onnx file.
        images: Normalised images (n,1,8,8) float32.

    Returns:
        Logits (n, 10) float32.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
    return np.asarray(logits)


def describe_weights(proto: onnx.ModelProto) -> list[tuple[str, tuple[int, ...]]]:
    """List the initializers of ``proto``.

    Args:
        proto: A model.

    Returns:
        ``(name, shape)`` for each initializer, in graph order.
    """
    return [(t.name, tuple(int(d) for d in t.dims)) for t in proto.graph.initializer]


def write_readme(
    path: Path,
    *,
    seed: int,
    epochs: int,
    split: Split,
    n_params: int,
    ort_accuracy: float,
    torch_accuracy: float,
    proto: onnx.ModelProto,
    model_bytes: bytes,
) -> None:
    """Write the models/ README describing how the files were made.

    Args:
        path: README path.
        seed: Seed used.
        epochs: Training epochs.
        split: The data split.
        n_params: Parameter count.
        ort_accuracy: FP32 held-out accuracy under onnxruntime.
        torch_accuracy: The same under torch.
        proto: The written model.
        model_bytes: Bytes of the written .onnx file (for its SHA-256).
    """
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    op_lines = ", ".join(f"{op} x{count}" for op, count in sorted(ops.items()))
    weight_lines = "\n".join(f"| `{name}` | {tuple(shape)} |" for name, shape in describe_weights(proto))
    command = COMMAND
    if (seed, epochs) != (0, DEFAULT_EPOCHS):
        command += f" --seed {seed} --epochs {epochs}"
    n_test = len(split.y_test)
    text = f"""# Demo model: digits CNN

A small convolutional network that classifies 8x8 handwritten digits, made by this repository
for the README demo and the end-to-end tests. It is small (a {n_params:,}-parameter,
{len(model_bytes) / 1024:.0f} KiB FP32 model) but has varied weight sites for the mixed-precision
bit-width search: four Conv layers (one of them 1-channel in, two inside a residual block), a
Gemm (Linear) and a MatMul with a constant weight followed by a bias Add.

Files:

- `{MODEL_FILE}`: ONNX, opset {OPSET}. Input `{INPUT_NAME}` float32 ({BATCH_DIM},1,8,8),
  output `{OUTPUT_NAME}` float32 ({BATCH_DIM},10); the batch dimension `{BATCH_DIM}` is dynamic.
- `{TEST_FILE}`: the held-out split. `input` float32 ({n_test},1,8,8), already normalised;
  `labels` int64 ({n_test},).
- `{CALIB_FILE}`: calibration data for activation quantization: {CALIB_COUNT} images of the
  training split (seeded sample), `input` float32 ({CALIB_COUNT},1,8,8), no labels.

**FP32 accuracy on the held-out split ({n_test} images), onnxruntime CPU: {ort_accuracy:.2%}**
(torch: {torch_accuracy:.2%}).

## How it was made

```
{command}
```

(`tools/make_model.py`; its docstring says how to make the torch venv). Training: Adam
(lr {LEARNING_RATE:g}), batch {BATCH_SIZE}, {epochs} epochs, cross-entropy, no augmentation,
seed {seed}, one thread, `torch.use_deterministic_algorithms(True)`. Export:
`torch.onnx.export(..., dynamo=False, opset_version={OPSET})` with torch {torch.__version__},
then `onnx.checker.check_model(full_check=True)` and shape inference (the inferred shapes are
stored in the file). SHA-256 of `{MODEL_FILE}`: `{hashlib.sha256(model_bytes).hexdigest()}`.

## Architecture

```
input (N,1,8,8)
Conv 3x3  1->16, pad 1, ReLU
Conv 3x3 16->32, pad 1, ReLU
residual block: Conv 3x3 32->32, pad 1, ReLU, Conv 3x3 32->32, pad 1, Add(skip), ReLU
MaxPool 2x2                       -> (N,32,4,4)
Flatten                           -> (N,512)
Linear 512->64, ReLU              (ONNX Gemm)
x @ W + b, 64->10                 (ONNX MatMul with constant W (64,10), then Add)
logits (N,10)
```

No BatchNorm. ONNX ops: {op_lines}.

| weight | shape |
| --- | --- |
{weight_lines}

## Input preprocessing

`sklearn.datasets.load_digits().images` holds integer pixel counts 0..16 (float64). The model
takes `(images.astype(float32) / 16)[:, None, :, :]`, i.e. values in [0, 1], shape (N,1,8,8),
no mean/std normalisation. `{TEST_FILE}` is stored already normalised.

## Data and licence

The images are scikit-learn's `load_digits()` (scikit-learn {sklearn.__version__}), shipped
inside the scikit-learn package (BSD-3-Clause licence), nothing downloaded. They are a copy of
the test part of the UCI "Optical Recognition of Handwritten Digits" dataset (optdigits;
E. Alpaydin and C. Kaynak, 1998), which the UCI Machine Learning Repository distributes under
CC BY 4.0. Split: `train_test_split(test_size={TEST_FRACTION}, stratify=labels,
random_state={seed})`: {len(split.y_train)} training and {n_test} held-out images.
"""
    path.write_text(text, encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments without the program name; ``None`` for ``sys.argv[1:]``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, init, shuffling")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train, export, verify with onnxruntime, write the files.

    Args:
        argv: Command-line arguments; ``None`` for ``sys.argv[1:]``.

    Returns:
        Exit status: 0, or 1 if accuracy is below :data:`MIN_ACCURACY` or ORT disagrees with torch.
    """
    args = parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)

    split = load_split(args.seed)
    print(f"digits: {len(split.y_train)} train, {len(split.y_test)} test")
    model = DigitsCNN()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}")
    train(model, split, args.epochs, args.seed)
    ref = torch_logits(model, split.x_test)
    torch_acc = float(np.mean(ref.argmax(axis=1) == split.y_test))

    model_path = out_dir / MODEL_FILE
    proto = export_onnx(model, model_path)
    test_path = out_dir / TEST_FILE
    np.savez_compressed(test_path, input=split.x_test, labels=split.y_test)
    pick = np.sort(np.random.default_rng(args.seed).choice(len(split.y_train), CALIB_COUNT, replace=False))
    np.savez_compressed(out_dir / CALIB_FILE, input=split.x_train[pick])

    with np.load(test_path) as saved:
        images, labels = saved["input"], saved["labels"]
    assert images.dtype == np.float32 and images.shape == (len(labels), 1, 8, 8)
    assert labels.dtype == np.int64
    got = ort_logits(model_path, images)
    ort_acc = float(np.mean(got.argmax(axis=1) == labels))
    max_diff = float(np.max(np.abs(got - ref)))
    same_pred = int(np.sum(got.argmax(axis=1) == ref.argmax(axis=1)))

    write_readme(
        out_dir / README_FILE,
        seed=args.seed,
        epochs=args.epochs,
        split=split,
        n_params=n_params,
        ort_accuracy=ort_acc,
        torch_accuracy=torch_acc,
        proto=proto,
        model_bytes=model_path.read_bytes(),
    )

    ops = collections.Counter(n.op_type for n in proto.graph.node)
    print(f"ONNX ops: {dict(sorted(ops.items()))}")
    for name, shape in describe_weights(proto):
        print(f"  weight {name}: {shape}")
    for path in (model_path, test_path, out_dir / README_FILE):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    print(f"test accuracy: torch {torch_acc:.4f}, onnxruntime {ort_acc:.4f}")
    print(
        f"onnxruntime vs torch: {same_pred}/{len(labels)} same predictions, max |logit diff| {max_diff:.2e}"
    )

    ok = True
    if same_pred != len(labels) or max_diff > 1e-3:
        print("error: onnxruntime and torch disagree", file=sys.stderr)
        ok = False
    if ort_acc < MIN_ACCURACY:
        print(f"error: accuracy {ort_acc:.4f} < {MIN_ACCURACY}", file=sys.stderr)
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
