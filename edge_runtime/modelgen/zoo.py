"""Ready-made models for tests, demos and benchmarks, deterministic from a seed.

Every function returns a ``BuiltModel``: the ``.tflite`` bytes together with the
recorded graph, so the caller can compute the expected outputs with the numpy
reference and feed the interpreter sample inputs of the right shape and dtype.
The same seed always gives byte-identical files (content-addressed stores rely on it).

``version_bias`` stands in for "retrained": it shifts the final layer's bias by
``version_bias`` times a fixed ramp, so two versions of one model share their
architecture and size but give different outputs (a softmax ignores a constant shift,
a ramp it does not).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edge_runtime.modelgen import reference
from edge_runtime.modelgen.writer import Graph, ModelBuilder, Quant, Tensor

VISION_CLASSES = 10
UNRESOLVED_CUSTOM_OP = "EdgefleetUnresolvedOp"


class IOSpec(NamedTuple):
    """Shape, dtype and (for int8) quantization of one model input or output."""

    shape: tuple[int, ...]
    dtype: np.dtype
    quant: Quant | None = None


@dataclass(frozen=True, eq=False)
class BuiltModel:
    """A serialised model plus the graph it was written from."""

    data: bytes
    graph: Graph

    @classmethod
    def from_builder(cls, builder: ModelBuilder) -> BuiltModel:
        graph = builder.graph()
        return cls(data=builder.build(), graph=graph)

    @property
    def inputs(self) -> dict[str, IOSpec]:
        """Input name to spec, in the graph's input order."""
        return {self.graph.tensors[i].name: _spec(self.graph, i) for i in self.graph.inputs}

    @property
    def outputs(self) -> dict[str, IOSpec]:
        """Output name to spec, in the graph's output order."""
        return {self.graph.tensors[i].name: _spec(self.graph, i) for i in self.graph.outputs}

    def reference(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs the numpy reference computes for ``inputs``.

        Raises:
            ValueError, TypeError: the inputs do not match the model.
            NotImplementedError: the model holds a CUSTOM op.
        """
        return reference.evaluate(self.graph, inputs)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model to ``path`` (parent directories are created)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.data)
        return target

    def sample_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic inputs: float32 uniform in [-1, 1), int8 uniform over its range."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for name, spec in self.inputs.items():
            if spec.dtype == np.int8:
                out[name] = rng.integers(-128, 128, size=spec.shape, dtype=np.int8)
            else:
                out[name] = rng.uniform(-1.0, 1.0, size=spec.shape).astype(spec.dtype)
        return out


def _spec(graph: Graph, index: int) -> IOSpec:
    t = graph.tensors[index]
    return IOSpec(shape=t.shape, dtype=t.dtype, quant=t.quant)


# -- models -----------------------------------------------------------------------------

_TINY_IN, _TINY_HIDDEN, _TINY_OUT = 16, 104, 4


def tiny_mlp(seed: int = 0, *, version_bias: float = 0.0) -> BuiltModel:
    """About 10 KB, float32: "x" (1, 16) -> FC, RELU, FC, SOFTMAX -> "y" (1, 4)."""
    return _tiny_mlp(seed, version_bias, quantized=False)


def tiny_mlp_int8(seed: int = 0) -> BuiltModel:
    """``tiny_mlp`` with the same float weights, fully int8 (input scale 1/64, zero point 0)."""
    return _tiny_mlp(seed, 0.0, quantized=True)


def _tiny_mlp(seed: int, version_bias: float, *, quantized: bool) -> BuiltModel:
    rng = np.random.default_rng(seed)
    w1 = _he(rng, (_TINY_HIDDEN, _TINY_IN), _TINY_IN)
    b1 = _small(rng, _TINY_HIDDEN)
    w2 = _he(rng, (_TINY_OUT, _TINY_HIDDEN), _TINY_HIDDEN)
    b2 = _small(rng, _TINY_OUT) + _ramp(version_bias, _TINY_OUT)
    kind = "int8" if quantized else "float32"
    b = ModelBuilder(description=f"edgefleet tiny_mlp {kind} seed={seed} version_bias={version_bias}")
    if quantized:
        x = b.input("x", shape=(1, _TINY_IN), dtype=np.int8, quant=Quant(1.0 / 64.0, 0))
    else:
        x = b.input("x", shape=(1, _TINY_IN))
    h = b.relu(b.fully_connected(x, weights=w1, bias=b1))
    y = b.softmax(b.fully_connected(h, weights=w2, bias=b2))
    b.output(y, name="y")
    return BuiltModel.from_builder(b)


def broken_mlp(seed: int = 0) -> BuiltModel:
    """``tiny_mlp``'s shape, but a bad export: the last layer's weights sit at the edge of
    float32, so its sums overflow to infinity and every output is NaN. It loads and runs;
    only a health check that looks at the outputs (every output finite) refuses it."""
    rng = np.random.default_rng(seed)
    w1 = _he(rng, (_TINY_HIDDEN, _TINY_IN), _TINY_IN)
    b1 = np.ones(_TINY_HIDDEN, np.float32)  # zeros in -> every hidden unit is 1
    w2 = np.full((_TINY_OUT, _TINY_HIDDEN), 3.0e38, np.float32)  # 32 of them sum past float32's max
    b2 = np.zeros(_TINY_OUT, np.float32)
    b = ModelBuilder(description=f"edgefleet broken_mlp seed={seed}")
    x = b.input("x", shape=(1, _TINY_IN))
    h = b.relu(b.fully_connected(x, weights=w1, bias=b1))
    y = b.softmax(b.fully_connected(h, weights=w2, bias=b2))
    b.output(y, name="y")
    return BuiltModel.from_builder(b)


def multi_io(seed: int = 0) -> BuiltModel:
    """Two inputs, two outputs: "a", "b" (1, 8) -> "sum" = a + b (1, 8), "probs" (1, 4)."""
    rng = np.random.default_rng(seed)
    b = ModelBuilder(description=f"edgefleet multi_io seed={seed}")
    a_in = b.input("a", shape=(1, 8))
    b_in = b.input("b", shape=(1, 8))
    total = b.add(a_in, b_in)
    h = b.fully_connected(total, weights=_he(rng, (16, 8), 8), bias=_small(rng, 16), activation="RELU")
    probs = b.softmax(b.fully_connected(h, weights=_he(rng, (4, 16), 16), bias=_small(rng, 4)))
    b.output(total, name="sum")
    b.output(probs, name="probs")
    return BuiltModel.from_builder(b)


@functools.lru_cache(maxsize=4)
def vision_net(seed: int = 0, *, version_bias: float = 0.0) -> BuiltModel:
    """A MobileNet-style float32 classifier: about 2.3 MB, 300 M multiply-adds.

    "image" (1, 224, 224, 3) -> strided conv, depthwise-separable RELU6 blocks down to
    7x7x512 (three with a residual ADD), a 7x7 VALID depthwise conv as the global
    reduction, RESHAPE, FC, SOFTMAX -> "probs" (1, 10). The compute sits in the
    high-resolution blocks, where it costs few parameters, so one invoke is a few
    milliseconds on a desktop core while the file stays small. Cached: the result is
    immutable.
    """
    return _vision_net(seed, version_bias, quantized=False)


@functools.lru_cache(maxsize=2)
def vision_net_int8(seed: int = 0) -> BuiltModel:
    """``vision_net`` with the same float weights, fully int8 (input scale 1/128, zero point 0)."""
    return _vision_net(seed, 0.0, quantized=True)


# (stride, output channels, residual) of each depthwise-separable block after the stem.
_VISION_STEM = 32
_VISION_BLOCKS = (
    (1, 64, False),
    (1, 64, True),
    (2, 128, False),
    (1, 128, True),
    (2, 256, False),
    (1, 256, True),
    (2, 512, False),
    (2, 512, False),
)


def _vision_net(seed: int, version_bias: float, *, quantized: bool) -> BuiltModel:
    rng = np.random.default_rng(seed)
    kind = "int8" if quantized else "float32"
    b = ModelBuilder(description=f"edgefleet vision_net {kind} seed={seed} version_bias={version_bias}")
    shape = (1, 224, 224, 3)
    if quantized:
        x = b.input("image", shape=shape, dtype=np.int8, quant=Quant(1.0 / 128.0, 0))
    else:
        x = b.input("image", shape=shape)
    x = b.conv2d(
        x, filters=_he(rng, (_VISION_STEM, 3, 3, 3), 27), bias=_small(rng, _VISION_STEM), stride=2, activation="RELU6"
    )
    for stride, channels, residual in _VISION_BLOCKS:
        y = _separable(b, rng, x, stride=stride, channels=channels)
        x = b.add(x, y) if residual else y
    channels = x.shape[3]
    x = b.depthwise_conv2d(
        x, filters=_he(rng, (1, 7, 7, channels), 49), bias=_small(rng, channels), padding="VALID", activation="RELU6"
    )
    x = b.reshape(x, (1, -1))
    logits = b.fully_connected(
        x,
        weights=_he(rng, (VISION_CLASSES, channels), channels),
        bias=_small(rng, VISION_CLASSES) + _ramp(version_bias, VISION_CLASSES),
    )
    b.output(b.softmax(logits), name="probs")
    return BuiltModel.from_builder(b)


def _separable(b: ModelBuilder, rng: np.random.Generator, x: Tensor, *, stride: int, channels: int) -> Tensor:
    depth = x.shape[3]
    x = b.depthwise_conv2d(
        x, filters=_he(rng, (1, 3, 3, depth), 9), bias=_small(rng, depth), stride=stride, activation="RELU6"
    )
    return b.conv2d(x, filters=_he(rng, (channels, 1, 1, depth), depth), bias=_small(rng, channels), activation="RELU6")


def custom_op_model() -> BuiltModel:
    """One CUSTOM "EdgefleetUnresolvedOp" from "x" (1, 4) to "y": parses, never allocates."""
    b = ModelBuilder(description="edgefleet custom_op_model (unresolvable on purpose)")
    x = b.input("x", shape=(1, 4))
    b.output(b.custom(UNRESOLVED_CUSTOM_OP, [x], output_shape=(1, 4)), name="y")
    return BuiltModel.from_builder(b)


# -- weights ----------------------------------------------------------------------------


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """He-normal weights keep activations of order one through a deep RELU stack."""
    return rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape).astype(np.float32)


def _small(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(0.0, 0.05, size=n).astype(np.float32)


def _ramp(version_bias: float, n: int) -> np.ndarray:
    return (version_bias * np.linspace(-1.0, 1.0, n)).astype(np.float32)
