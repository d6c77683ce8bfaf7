"""An independent numpy evaluator for modelgen graphs.

It computes what a model *should* output with nothing but numpy, in float64:
convolution as an explicit im2col matrix product, TFLite's SAME/VALID padding
arithmetic, depthwise convolution, fully connected, add, relu/relu6, reshape and
softmax. It reads the recorded ``Graph``, never the flatbuffer and never an
interpreter, so agreement with the interpreter tests both the writer and the file.

Int8 tensors follow the specification of the integer kernels rather than their
fixed-point arithmetic: dequantize the inputs, run the float op, requantize the
output (round half away from zero, clamp to [-128, 127]). An interpreter may land a
unit away per op; compare with a tolerance of a couple of quantized units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:  # the writer imports this module, so its types are for checkers only
    from edge_runtime.modelgen.writer import Graph, OpDef, Quant, TensorDef


def evaluate(graph: Graph, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``graph`` on named inputs and return its named outputs (in their dtypes).

    Raises:
        ValueError: an input is missing, unknown or has the wrong shape.
        TypeError: an input has the wrong dtype.
        NotImplementedError: the graph holds an op the reference cannot run (CUSTOM).
    """
    expected = dict(zip(graph.input_names, graph.inputs))
    missing = sorted(set(expected) - set(inputs))
    unknown = sorted(set(inputs) - set(expected))
    if missing or unknown:
        raise ValueError(f"inputs: expected {sorted(expected)}, missing {missing}, unknown {unknown}")
    values: dict[int, np.ndarray] = {}
    for name, index in expected.items():
        spec = graph.tensors[index]
        arr = np.asarray(inputs[name])
        if arr.dtype != spec.dtype:
            raise TypeError(f"input {name!r}: expected dtype {spec.dtype}, got {arr.dtype}")
        if arr.shape != spec.shape:
            raise ValueError(f"input {name!r}: expected shape {spec.shape}, got {arr.shape}")
        values[index] = arr
    for op in graph.ops:
        args = [real_value(graph.tensors[i], values.get(i)) for i in op.inputs]
        (out_index,) = op.outputs
        out = graph.tensors[out_index]
        result = op_float(op, args)
        if result.shape != out.shape:
            raise AssertionError(f"{out.name}: reference produced {result.shape}, graph says {out.shape}")
        values[out_index] = quantize(result, out.quant) if out.quant is not None else result.astype(out.dtype)
    return {graph.tensors[i].name: values[i] for i in graph.outputs}


def real_value(tensor: TensorDef, stored: np.ndarray | None = None) -> np.ndarray:
    """The real (float64) value of a tensor: its constant data, or ``stored``, dequantized."""
    data = tensor.data if tensor.data is not None else stored
    if data is None:
        raise ValueError(f"tensor {tensor.name!r} has no value yet")
    if tensor.quant is not None:
        return dequantize(data, tensor.quant)
    return np.asarray(data, dtype=np.float64)


def op_float(op: OpDef, args: Sequence[np.ndarray]) -> np.ndarray:
    """Run one op on real-valued inputs (constants included), in float64."""
    run = _OPS.get(op.kind)
    if run is None:
        name = f"{op.kind} {op.custom_code!r}" if op.custom_code else op.kind
        raise NotImplementedError(f"the reference evaluator cannot run {name}")
    return run(args, op.options)


# -- quantization -----------------------------------------------------------------------


def dequantize(q: np.ndarray, quant: Quant) -> np.ndarray:
    """``scale * (q - zero_point)`` in float64, per tensor or along ``quant.axis``."""
    q = np.asarray(q, dtype=np.float64)
    scales, zero_points = quant.scales, quant.zero_points.astype(np.float64)
    if scales.size > 1:
        shape = [1] * q.ndim
        shape[quant.axis] = -1
        scales, zero_points = scales.reshape(shape), zero_points.reshape(shape)
    return (q - zero_points) * scales


def quantize(x: np.ndarray, quant: Quant) -> np.ndarray:
    """Per-tensor int8 requantization: round half away from zero, then clamp."""
    scale, zero_point = float(quant.scales[0]), int(quant.zero_points[0])
    scaled = np.asarray(x, dtype=np.float64) / scale
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return np.clip(rounded + zero_point, -128, 127).astype(np.int8)


# -- float kernels ----------------------------------------------------------------------


def activate(x: np.ndarray, activation: str) -> np.ndarray:
    """A fused activation: "NONE", "RELU" or "RELU6"."""
    if activation == "NONE":
        return x
    if activation == "RELU":
        return np.maximum(x, 0.0)
    if activation == "RELU6":
        return np.clip(x, 0.0, 6.0)
    raise ValueError(f"unknown activation {activation!r}")


def padding_1d(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int, int]:
    """TFLite's padding arithmetic for one spatial axis: (pad_before, pad_after, out_size).

    SAME gives ``ceil(size / stride)`` outputs; when the needed padding is odd the extra
    row goes after, as in TensorFlow.
    """
    if padding == "VALID":
        return 0, 0, (size - kernel) // stride + 1
    if padding != "SAME":
        raise ValueError(f"unknown padding {padding!r}")
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def _windows(x: np.ndarray, kh: int, kw: int, stride: tuple[int, int], padding: str) -> np.ndarray:
    """Every (kh, kw) input window the kernel sees: shape (N, out_h, out_w, C, kh, kw)."""
    sh, sw = stride
    top, bottom, out_h = padding_1d(x.shape[1], kh, sh, padding)
    left, right, out_w = padding_1d(x.shape[2], kw, sw, padding)
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    windows = sliding_window_view(padded, (kh, kw), axis=(1, 2))
    return windows[:, : (out_h - 1) * sh + 1 : sh, : (out_w - 1) * sw + 1 : sw]


def conv2d(
    x: np.ndarray,
    filters: np.ndarray,
    bias: np.ndarray,
    *,
    stride: tuple[int, int],
    padding: str,
    activation: str,
) -> np.ndarray:
    """NHWC convolution with ``(out, kh, kw, in)`` filters, by im2col and one matmul."""
    out_ch, kh, kw, in_ch = filters.shape
    windows = _windows(x, kh, kw, stride, padding)
    n, out_h, out_w = windows.shape[:3]
    # Order each patch as (kh, kw, in) so it lines up with a filter row.
    columns = windows.transpose(0, 1, 2, 4, 5, 3).reshape(n * out_h * out_w, kh * kw * in_ch)
    out = columns @ filters.reshape(out_ch, kh * kw * in_ch).T + bias
    return activate(out.reshape(n, out_h, out_w, out_ch), activation)


def depthwise_conv2d(
    x: np.ndarray,
    filters: np.ndarray,
    bias: np.ndarray,
    *,
    stride: tuple[int, int],
    padding: str,
    depth_multiplier: int,
    activation: str,
) -> np.ndarray:
    """Depthwise NHWC convolution; output channel ``c * depth_multiplier + m``."""
    _, kh, kw, out_ch = filters.shape
    in_ch = x.shape[3]
    windows = _windows(x, kh, kw, stride, padding)
    n, out_h, out_w = windows.shape[:3]
    taps = filters.reshape(kh, kw, in_ch, depth_multiplier)
    out = np.einsum("nhwcij,ijcm->nhwcm", windows, taps).reshape(n, out_h, out_w, out_ch) + bias
    return activate(out, activation)


def fully_connected(x: np.ndarray, weights: np.ndarray, bias: np.ndarray, *, activation: str) -> np.ndarray:
    """``x`` flattened to rows of ``weights.shape[1]``, times ``weights`` transposed."""
    rows = x.reshape(-1, weights.shape[1])
    return activate(rows @ weights.T + bias, activation)


def add(a: np.ndarray, b: np.ndarray, *, activation: str) -> np.ndarray:
    return activate(a + b, activation)


def softmax(x: np.ndarray, *, beta: float) -> np.ndarray:
    """Softmax over the last axis of ``beta * x``."""
    z = beta * x
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


_Kernel = Callable[[Sequence[np.ndarray], Mapping[str, Any]], np.ndarray]
_OPS: dict[str, _Kernel] = {
    "CONV_2D": lambda a, o: conv2d(
        a[0], a[1], a[2], stride=o["stride"], padding=o["padding"], activation=o["activation"]
    ),
    "DEPTHWISE_CONV_2D": lambda a, o: depthwise_conv2d(
        a[0],
        a[1],
        a[2],
        stride=o["stride"],
        padding=o["padding"],
        depth_multiplier=o["depth_multiplier"],
        activation=o["activation"],
    ),
    "FULLY_CONNECTED": lambda a, o: fully_connected(a[0], a[1], a[2], activation=o["activation"]),
    "ADD": lambda a, o: add(a[0], a[1], activation=o["activation"]),
    "RELU": lambda a, o: activate(a[0], "RELU"),
    "RELU6": lambda a, o: activate(a[0], "RELU6"),
    "RESHAPE": lambda a, o: a[0].reshape(o["new_shape"]),
    "SOFTMAX": lambda a, o: softmax(a[0], beta=o["beta"]),
}
