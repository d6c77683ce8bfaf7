"""Pure-Python TFLite model writing for tests, demos and benchmarks (no TensorFlow).

This package owns three things: ``ModelBuilder``, which records a graph from numpy
weights and serialises it to a ``.tflite`` flatbuffer (float32 or full-integer int8);
the numpy ``reference`` evaluator that computes what such a graph should output; and
the ``zoo`` of ready-made, seed-deterministic models. It needs ``flatbuffers`` and the
``tflite`` schema package (the ``modelgen`` extra); the device runtime never imports it.
"""

from edge_runtime.modelgen.reference import evaluate
from edge_runtime.modelgen.writer import (
    Graph,
    ModelBuilder,
    OpDef,
    Quant,
    Tensor,
    TensorDef,
    serialize,
)
from edge_runtime.modelgen.zoo import (
    BuiltModel,
    IOSpec,
    custom_op_model,
    multi_io,
    tiny_mlp,
    tiny_mlp_int8,
    vision_net,
    vision_net_int8,
)

__all__ = [
    "BuiltModel",
    "Graph",
    "IOSpec",
    "ModelBuilder",
    "OpDef",
    "Quant",
    "Tensor",
    "TensorDef",
    "custom_op_model",
    "evaluate",
    "multi_io",
    "serialize",
    "tiny_mlp",
    "tiny_mlp_int8",
    "vision_net",
    "vision_net_int8",
]
