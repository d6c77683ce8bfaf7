"""Record a small graph from numpy weights and serialise it as a TFLite flatbuffer.

``ModelBuilder`` does two things and keeps them apart: it records the graph in a
plain, frozen IR (``Graph`` of ``TensorDef`` and ``OpDef``) and ``build()`` turns
that IR into schema-version-3 flatbuffer bytes with the generated builder
functions of the ``tflite`` package. The same IR feeds the numpy evaluator in
``reference.py``, so a test can check the real interpreter against an independent
computation of exactly the model it loaded.

Int8 graphs. The caller always gives float weights; the builder quantizes them the
way TFLite's full-integer post-training quantization does: symmetric int8 weights
(per output channel for convolutions, per tensor for fully connected, which every
runtime version can run) and int32 bias at ``input_scale * weight_scale``. The quantization of each op output is either given
(``out_quant=``) or calibrated: every int8 input carries calibration samples
(by default uniform over the range its quantization can represent) that the builder
pushes through the float version of each op as the op is added; the output range is
the observed min/max, widened to include zero. SOFTMAX and RESHAPE have fixed output
quantization (``1/256, -128`` and "same as the input"), as the int8 kernels require.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Union

import flatbuffers
import numpy as np
import tflite

from edge_runtime.modelgen import reference as _reference

Activation = Literal["NONE", "RELU", "RELU6"]
PaddingMode = Literal["SAME", "VALID"]
DTypeLike = Union[type, np.dtype, str]

SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"
SIGNATURE_KEY = "serving_default"

FLOAT32 = np.dtype(np.float32)
INT8 = np.dtype(np.int8)
INT32 = np.dtype(np.int32)
_ACTIVATION_DTYPES = (FLOAT32, INT8)
_ACTIVATIONS = ("NONE", "RELU", "RELU6")
_PADDINGS = ("SAME", "VALID")
# Weight data lands 16-byte aligned in the file, so kernels may map it in place.
_BUFFER_ALIGNMENT = 16
_CALIBRATION_SEED = 0x5EED
# Keep the calibration pass cheap: many samples for small inputs, one for images.
_CALIBRATION_ELEMENTS = 1 << 16
_builder_ids = itertools.count(1)


@dataclass(frozen=True)
class Quant:
    """Affine quantization: ``real = scale * (q - zero_point)``.

    Scales are rounded to float32 on construction because that is what the
    flatbuffer stores, and the reference must use the numbers the interpreter reads.
    A tuple ``scale`` means per-channel quantization along ``axis`` (weights only).
    """

    scale: float | tuple[float, ...]
    zero_point: int | tuple[int, ...] = 0
    axis: int = 0

    def __post_init__(self) -> None:
        per_channel = isinstance(self.scale, (tuple, list, np.ndarray))
        scales = np.atleast_1d(np.asarray(self.scale, dtype=np.float64)).astype(np.float32)
        zero_points = np.atleast_1d(np.asarray(self.zero_point, dtype=np.int64))
        if scales.ndim != 1 or scales.size == 0:
            raise ValueError(f"Quant: scale must be a number or a non-empty 1-D sequence, got {self.scale!r}")
        if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
            raise ValueError(f"Quant: scales must be finite and > 0, got {self.scale!r}")
        if zero_points.ndim != 1 or zero_points.size not in (1, scales.size):
            raise ValueError(f"Quant: {zero_points.size} zero points for {scales.size} scales")
        if self.axis < 0:
            raise ValueError(f"Quant: axis must be >= 0, got {self.axis}")
        if per_channel:
            zero_points = np.broadcast_to(zero_points, scales.shape)
            object.__setattr__(self, "scale", tuple(float(s) for s in scales))
            object.__setattr__(self, "zero_point", tuple(int(z) for z in zero_points))
        else:
            if zero_points.size != 1:
                raise ValueError("Quant: a per-tensor scale takes a single zero point")
            object.__setattr__(self, "scale", float(scales[0]))
            object.__setattr__(self, "zero_point", int(zero_points[0]))

    @property
    def per_channel(self) -> bool:
        return isinstance(self.scale, tuple)

    @property
    def scales(self) -> np.ndarray:
        """The scales as a float64 vector (one entry when per tensor)."""
        return np.atleast_1d(np.asarray(self.scale, dtype=np.float64))

    @property
    def zero_points(self) -> np.ndarray:
        """The zero points as an int64 vector (one entry when per tensor)."""
        return np.atleast_1d(np.asarray(self.zero_point, dtype=np.int64))


@dataclass(frozen=True)
class Tensor:
    """A handle to one tensor of the graph being built; pass it to the next op."""

    index: int
    shape: tuple[int, ...]
    dtype: np.dtype
    quant: Quant | None = None
    builder_id: int = field(default=0, repr=False, compare=False)


@dataclass(frozen=True, eq=False)
class TensorDef:
    """One tensor of a finished graph; ``data`` (read-only, stored dtype) marks a constant."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    quant: Quant | None = None
    data: np.ndarray | None = None

    @property
    def is_constant(self) -> bool:
        return self.data is not None


@dataclass(frozen=True, eq=False)
class OpDef:
    """One operator: ``kind`` is the BuiltinOperator name ("CONV_2D", ..., "CUSTOM")."""

    kind: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    custom_code: str | None = None


@dataclass(frozen=True, eq=False)
class Graph:
    """A finished single-subgraph model, in execution order."""

    tensors: tuple[TensorDef, ...]
    ops: tuple[OpDef, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    description: str = ""

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.tensors[i].name for i in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.tensors[i].name for i in self.outputs)


class ModelBuilder:
    """Build a TFLite model op by op; ``build()`` returns the flatbuffer bytes.

    Activations are float32 or int8 (with ``Quant``); an op takes the dtype of its
    inputs, and mixing the two in one op is an error rather than a silent cast.
    Shapes are static: every output shape is computed here, the way TFLite computes it.
    """

    def __init__(self, *, description: str = "edgefleet modelgen") -> None:
        self._id = next(_builder_ids)
        self._description = description
        self._tensors: list[TensorDef] = []
        self._ops: list[OpDef] = []
        self._inputs: list[int] = []
        self._outputs: list[int] = []
        self._names: set[str] = set()
        self._op_counts: dict[str, int] = {}
        # Float calibration samples of every int8 activation tensor, by tensor index.
        self._calibration: dict[int, list[np.ndarray]] = {}

    # -- graph inputs and outputs ---------------------------------------------------

    def input(
        self,
        name: str,
        *,
        shape: Sequence[int],
        dtype: DTypeLike = np.float32,
        quant: Quant | None = None,
        calibration: np.ndarray | None = None,
    ) -> Tensor:
        """Declare a graph input.

        ``calibration`` (float, shape ``(k, *shape)``) only matters for int8 inputs
        whose downstream ops leave ``out_quant`` unset; without it the builder draws
        samples uniformly over the range ``quant`` can represent.
        """
        dt = _activation_dtype(dtype, f"input {name!r}")
        dims = _static_shape(shape, f"input {name!r}")
        samples: list[np.ndarray] = []
        if dt == INT8:
            if quant is None:
                raise ValueError(f"input {name!r}: an int8 input needs quant=Quant(scale, zero_point)")
            _check_activation_quant(quant, f"input {name!r}")
            samples = _input_samples(dims, quant, calibration, name)
        elif quant is not None or calibration is not None:
            raise ValueError(f"input {name!r}: quant and calibration are only meaningful for int8 inputs")
        tensor = self._add_tensor(name, dims, dt, quant)
        self._inputs.append(tensor.index)
        if samples:
            self._calibration[tensor.index] = samples
        return tensor

    def output(self, tensor: Tensor, *, name: str) -> None:
        """Mark ``tensor`` as a graph output; the tensor takes ``name`` in the file."""
        td = self._own(tensor, "output")
        if tensor.index in self._inputs:
            raise ValueError(f"output {name!r}: a graph input cannot also be an output")
        if tensor.index in self._outputs:
            raise ValueError(f"output {name!r}: tensor is already the output {td.name!r}")
        if name != td.name:
            self._claim_name(name)
            self._names.discard(td.name)
            self._tensors[tensor.index] = dataclasses.replace(td, name=name)
        self._outputs.append(tensor.index)

    # -- operators ------------------------------------------------------------------

    def conv2d(
        self,
        x: Tensor,
        *,
        filters: np.ndarray,
        bias: np.ndarray | None = None,
        stride: int | tuple[int, int] = 1,
        padding: PaddingMode = "SAME",
        activation: Activation = "NONE",
        out_quant: Quant | None = None,
    ) -> Tensor:
        """CONV_2D; ``filters`` is ``(out_channels, kh, kw, in_channels)``, as in TFLite."""
        self._own(x, "conv2d", rank=4)
        w = _float_array(filters, "conv2d filters", ndim=4)
        out_ch, kh, kw, in_ch = w.shape
        if in_ch != x.shape[3]:
            raise ValueError(f"conv2d: filters expect {in_ch} input channels, the input has {x.shape[3]}")
        b = _bias(bias, out_ch, "conv2d")
        sh, sw = _pair(stride, "conv2d stride")
        pad = _choice(padding, _PADDINGS, "padding")
        act = _choice(activation, _ACTIVATIONS, "activation")
        out_shape = (x.shape[0], _out_size(x.shape[1], kh, sh, pad), _out_size(x.shape[2], kw, sw, pad), out_ch)
        prefix = self._op_prefix("conv2d")
        wt, bt = self._weights(prefix, x, w, b, weight_axis=0, name="filter")
        options = {"stride": (sh, sw), "padding": pad, "activation": act}
        return self._emit("CONV_2D", prefix, (x.index, wt, bt), out_shape, x.dtype, options, out_quant)

    def depthwise_conv2d(
        self,
        x: Tensor,
        *,
        filters: np.ndarray,
        bias: np.ndarray | None = None,
        stride: int | tuple[int, int] = 1,
        padding: PaddingMode = "SAME",
        depth_multiplier: int = 1,
        activation: Activation = "NONE",
        out_quant: Quant | None = None,
    ) -> Tensor:
        """DEPTHWISE_CONV_2D; ``filters`` is ``(1, kh, kw, in_channels * depth_multiplier)``."""
        self._own(x, "depthwise_conv2d", rank=4)
        w = _float_array(filters, "depthwise_conv2d filters", ndim=4)
        one, kh, kw, out_ch = w.shape
        if depth_multiplier < 1:
            raise ValueError(f"depthwise_conv2d: depth_multiplier must be >= 1, got {depth_multiplier}")
        if one != 1 or out_ch != x.shape[3] * depth_multiplier:
            raise ValueError(
                f"depthwise_conv2d: filters must be (1, kh, kw, {x.shape[3] * depth_multiplier}) "
                f"for {x.shape[3]} channels x multiplier {depth_multiplier}, got {w.shape}"
            )
        b = _bias(bias, out_ch, "depthwise_conv2d")
        sh, sw = _pair(stride, "depthwise_conv2d stride")
        pad = _choice(padding, _PADDINGS, "padding")
        act = _choice(activation, _ACTIVATIONS, "activation")
        out_shape = (x.shape[0], _out_size(x.shape[1], kh, sh, pad), _out_size(x.shape[2], kw, sw, pad), out_ch)
        prefix = self._op_prefix("depthwise_conv2d")
        wt, bt = self._weights(prefix, x, w, b, weight_axis=3, name="filter")
        options = {"stride": (sh, sw), "padding": pad, "activation": act, "depth_multiplier": depth_multiplier}
        return self._emit("DEPTHWISE_CONV_2D", prefix, (x.index, wt, bt), out_shape, x.dtype, options, out_quant)

    def fully_connected(
        self,
        x: Tensor,
        *,
        weights: np.ndarray,
        bias: np.ndarray | None = None,
        activation: Activation = "NONE",
        out_quant: Quant | None = None,
    ) -> Tensor:
        """FULLY_CONNECTED; ``weights`` is ``(out, in)``. The input is flattened to
        ``(size // in, in)``, as TFLite does without ``keep_num_dims``."""
        self._own(x, "fully_connected")
        w = _float_array(weights, "fully_connected weights", ndim=2)
        units, depth = w.shape
        size = math.prod(x.shape)
        if size % depth:
            raise ValueError(f"fully_connected: input of {size} elements does not split into rows of {depth}")
        b = _bias(bias, units, "fully_connected")
        act = _choice(activation, _ACTIVATIONS, "activation")
        prefix = self._op_prefix("fully_connected")
        wt, bt = self._weights(prefix, x, w, b, weight_axis=None, name="weights")
        options = {"activation": act}
        out_shape = (size // depth, units)
        return self._emit("FULLY_CONNECTED", prefix, (x.index, wt, bt), out_shape, x.dtype, options, out_quant)

    def add(
        self,
        a: Tensor,
        b: Tensor,
        *,
        activation: Activation = "NONE",
        out_quant: Quant | None = None,
    ) -> Tensor:
        """ADD with numpy broadcasting; int8 inputs may have different scales."""
        self._own(a, "add")
        self._own(b, "add")
        if a.dtype != b.dtype:
            raise TypeError(f"add: operands are {a.dtype} and {b.dtype}; both must have the same dtype")
        try:
            out_shape = tuple(int(d) for d in np.broadcast_shapes(a.shape, b.shape))
        except ValueError:
            raise ValueError(f"add: shapes {a.shape} and {b.shape} do not broadcast") from None
        act = _choice(activation, _ACTIVATIONS, "activation")
        prefix = self._op_prefix("add")
        return self._emit("ADD", prefix, (a.index, b.index), out_shape, a.dtype, {"activation": act}, out_quant)

    def relu(self, x: Tensor, *, out_quant: Quant | None = None) -> Tensor:
        """RELU as its own op (fused activations are the ``activation=`` options)."""
        self._own(x, "relu")
        return self._emit("RELU", self._op_prefix("relu"), (x.index,), x.shape, x.dtype, {}, out_quant)

    def relu6(self, x: Tensor, *, out_quant: Quant | None = None) -> Tensor:
        """RELU6 as its own op."""
        self._own(x, "relu6")
        return self._emit("RELU6", self._op_prefix("relu6"), (x.index,), x.shape, x.dtype, {}, out_quant)

    def reshape(self, x: Tensor, shape: Sequence[int]) -> Tensor:
        """RESHAPE; one ``-1`` is resolved here, so the file holds a static shape."""
        self._own(x, "reshape")
        new_shape = _resolve_reshape(x.shape, shape)
        prefix = self._op_prefix("reshape")
        shape_t = self._const(f"{prefix}/shape", np.asarray(new_shape, dtype=np.int32))
        options = {"new_shape": new_shape}
        return self._emit("RESHAPE", prefix, (x.index, shape_t), new_shape, x.dtype, options, x.quant)

    def softmax(self, x: Tensor, *, beta: float = 1.0) -> Tensor:
        """SOFTMAX over the last axis; int8 output is fixed at scale 1/256, zero point -128."""
        self._own(x, "softmax")
        if not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"softmax: beta must be finite and > 0, got {beta}")
        fixed = Quant(1.0 / 256.0, -128) if x.dtype == INT8 else None
        prefix = self._op_prefix("softmax")
        return self._emit("SOFTMAX", prefix, (x.index,), x.shape, x.dtype, {"beta": float(beta)}, fixed)

    def custom(
        self,
        op_name: str,
        inputs: Sequence[Tensor],
        *,
        output_shape: Sequence[int],
        dtype: DTypeLike = np.float32,
    ) -> Tensor:
        """A CUSTOM op named ``op_name``; no interpreter resolves it unless registered.

        Exists so tests can produce models that fail to load the way a model built
        for a different runtime does. The reference evaluator refuses to run it.
        """
        if not op_name:
            raise ValueError("custom: op_name must not be empty")
        for t in inputs:
            self._own(t, "custom")
        dt = _activation_dtype(dtype, f"custom op {op_name!r}")
        dims = _static_shape(output_shape, f"custom op {op_name!r}")
        quant = Quant(1.0) if dt == INT8 else None
        y = self._add_tensor(f"{self._op_prefix('custom')}/out", dims, dt, quant)
        self._ops.append(OpDef("CUSTOM", tuple(t.index for t in inputs), (y.index,), custom_code=op_name))
        return y

    # -- results --------------------------------------------------------------------

    def graph(self) -> Graph:
        """A frozen snapshot of the graph built so far.

        Raises:
            ValueError: the graph has no input or no output yet.
        """
        if not self._inputs:
            raise ValueError("graph has no inputs: call input() first")
        if not self._outputs:
            raise ValueError("graph has no outputs: call output() on at least one tensor")
        return Graph(
            tensors=tuple(self._tensors),
            ops=tuple(self._ops),
            inputs=tuple(self._inputs),
            outputs=tuple(self._outputs),
            description=self._description,
        )

    def build(self) -> bytes:
        """Serialise the graph to TFLite flatbuffer bytes."""
        return serialize(self.graph())

    # -- internals ------------------------------------------------------------------

    def _own(self, tensor: Tensor, op: str, *, rank: int | None = None) -> TensorDef:
        if not isinstance(tensor, Tensor) or tensor.builder_id != self._id:
            raise ValueError(f"{op}: {tensor!r} is not a tensor of this builder")
        td = self._tensors[tensor.index]
        if rank is not None and len(tensor.shape) != rank:
            raise ValueError(f"{op}: expects a rank-{rank} (NHWC) input, got shape {tensor.shape}")
        return td

    def _claim_name(self, name: str) -> None:
        if not name:
            raise ValueError("tensor names must not be empty")
        if name in self._names:
            raise ValueError(f"tensor name {name!r} is already used in this graph")
        self._names.add(name)

    def _op_prefix(self, op: str) -> str:
        n = self._op_counts.get(op, 0)
        self._op_counts[op] = n + 1
        return f"{op}_{n}"

    def _add_tensor(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        quant: Quant | None = None,
        data: np.ndarray | None = None,
    ) -> Tensor:
        self._claim_name(name)
        if data is not None:
            data = np.array(data, dtype=dtype, copy=True)
            data.setflags(write=False)
        self._tensors.append(TensorDef(name=name, shape=shape, dtype=dtype, quant=quant, data=data))
        return Tensor(index=len(self._tensors) - 1, shape=shape, dtype=dtype, quant=quant, builder_id=self._id)

    def _const(self, name: str, data: np.ndarray, quant: Quant | None = None) -> int:
        return self._add_tensor(name, tuple(int(d) for d in data.shape), data.dtype, quant, data).index

    def _weights(
        self,
        prefix: str,
        x: Tensor,
        w: np.ndarray,
        b: np.ndarray,
        *,
        weight_axis: int | None,
        name: str,
    ) -> tuple[int, int]:
        """Add weight and bias constants, quantized when the activation is int8."""
        if x.dtype == FLOAT32:
            return (
                self._const(f"{prefix}/{name}", w.astype(np.float32)),
                self._const(f"{prefix}/bias", b.astype(np.float32)),
            )
        assert x.quant is not None
        wq, w_quant = quantize_symmetric(w, axis=weight_axis)
        bias_scales = x.quant.scales[0] * w_quant.scales
        bias_quant = Quant(tuple(bias_scales), 0, axis=0) if w_quant.per_channel else Quant(float(bias_scales[0]), 0)
        bq = np.clip(_round_half_away(b / bias_quant.scales), np.iinfo(np.int32).min, np.iinfo(np.int32).max)
        return (
            self._const(f"{prefix}/{name}", wq, w_quant),
            self._const(f"{prefix}/bias", bq.astype(np.int32), bias_quant),
        )

    def _emit(
        self,
        kind: str,
        prefix: str,
        inputs: tuple[int, ...],
        out_shape: tuple[int, ...],
        dtype: np.dtype,
        options: dict[str, Any],
        out_quant: Quant | None,
    ) -> Tensor:
        """Append one op and its output tensor, calibrating int8 output ranges."""
        acts = [i for i in inputs if not self._tensors[i].is_constant]
        if any(self._tensors[i].dtype != dtype for i in acts):
            kinds = ", ".join(str(self._tensors[i].dtype) for i in acts)
            raise TypeError(f"{prefix}: inputs mix dtypes ({kinds}); convert the graph as a whole")
        op = OpDef(kind, inputs, (len(self._tensors),), MappingProxyType(dict(options)))
        quant: Quant | None = None
        samples: list[np.ndarray] = []
        if dtype == INT8:
            samples = self._calibrate(op)
            if out_quant is None:
                if not samples:
                    raise ValueError(f"{prefix}: no calibration data flows through a CUSTOM op; pass out_quant=")
                out_quant = quant_from_range(min(float(s.min()) for s in samples), max(float(s.max()) for s in samples))
            _check_activation_quant(out_quant, f"{prefix} out_quant")
            quant = out_quant
        elif out_quant is not None:
            raise ValueError(f"{prefix}: out_quant is only meaningful for int8 graphs")
        y = self._add_tensor(f"{prefix}/out", out_shape, dtype, quant)
        self._ops.append(op)
        if samples:
            self._calibration[y.index] = samples
        return y

    def _calibrate(self, op: OpDef) -> list[np.ndarray]:
        """Run the float version of ``op`` over every calibration sample (none past a CUSTOM op)."""
        acts = [i for i in op.inputs if not self._tensors[i].is_constant]
        if any(i not in self._calibration for i in acts):
            return []
        n = min(len(self._calibration[i]) for i in acts)
        out = []
        for k in range(n):
            args = [
                self._calibration[i][k] if i in self._calibration else _reference.real_value(self._tensors[i])
                for i in op.inputs
            ]
            out.append(_reference.op_float(op, args))
        return out


# -- quantization helpers -------------------------------------------------------------


def quantize_symmetric(w: np.ndarray, *, axis: int | None) -> tuple[np.ndarray, Quant]:
    """Symmetric int8 in [-127, 127], per tensor (``axis=None``) or per channel."""
    w = np.asarray(w, dtype=np.float64)
    if axis is None:
        max_abs = np.atleast_1d(np.max(np.abs(w)))
    else:
        other = tuple(d for d in range(w.ndim) if d != axis)
        max_abs = np.max(np.abs(w), axis=other)
    scales = np.where(max_abs > 0, max_abs / 127.0, 1.0)
    quant = Quant(float(scales[0]), 0) if axis is None else Quant(tuple(scales), 0, axis=axis)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(_round_half_away(w / quant.scales.reshape(shape)), -127, 127)
    return q.astype(np.int8), quant


def quant_from_range(lo: float, hi: float) -> Quant:
    """Asymmetric int8 quantization covering ``[lo, hi]`` widened to include zero."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-6:
        hi = lo + 1e-6
    scale = (hi - lo) / 255.0
    zero_point = int(np.clip(_round_half_away(np.asarray(-128.0 - lo / scale)), -128, 127))
    return Quant(scale, zero_point)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _check_activation_quant(quant: Quant, what: str) -> None:
    if quant.per_channel:
        raise ValueError(f"{what}: activations take per-tensor quantization")
    if not -128 <= int(quant.zero_point) <= 127:  # type: ignore[arg-type]
        raise ValueError(f"{what}: int8 zero point {quant.zero_point} is outside [-128, 127]")


def _input_samples(shape: tuple[int, ...], quant: Quant, calibration: np.ndarray | None, name: str) -> list[np.ndarray]:
    if calibration is not None:
        cal = np.asarray(calibration, dtype=np.float64)
        if cal.ndim != len(shape) + 1 or cal.shape[1:] != shape or cal.shape[0] < 1:
            raise ValueError(f"input {name!r}: calibration must have shape (k, *{shape}), got {cal.shape}")
        return [cal[k] for k in range(cal.shape[0])]
    scale, zp = quant.scales[0], int(quant.zero_points[0])
    lo, hi = (-128 - zp) * scale, (127 - zp) * scale
    count = max(1, min(8, _CALIBRATION_ELEMENTS // max(1, math.prod(shape))))
    rng = np.random.default_rng(_CALIBRATION_SEED)
    return [rng.uniform(lo, hi, size=shape) for _ in range(count)]


# -- argument checking ----------------------------------------------------------------


def _activation_dtype(dtype: DTypeLike, what: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{what}: {dtype!r} is not a dtype") from None
    if dt not in _ACTIVATION_DTYPES:
        raise TypeError(f"{what}: activations are float32 or int8, got {dt}")
    return dt


def _static_shape(shape: Sequence[int], what: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"{what}: shape must be non-empty with positive dimensions, got {tuple(shape)}")
    return dims


def _float_array(value: np.ndarray, what: str, *, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{what}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim} dimensions, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: contains NaN or infinity")
    return arr


def _bias(bias: np.ndarray | None, channels: int, op: str) -> np.ndarray:
    if bias is None:
        return np.zeros(channels, dtype=np.float32)
    b = _float_array(bias, f"{op} bias", ndim=1)
    if b.shape != (channels,):
        raise ValueError(f"{op}: bias must have shape ({channels},), got {b.shape}")
    return b


def _pair(value: int | tuple[int, int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise ValueError(f"{what}: expected a positive int or (h, w), got {value!r}")
    return int(pair[0]), int(pair[1])


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _out_size(size: int, kernel: int, stride: int, padding: str) -> int:
    if padding == "SAME":
        return -(-size // stride)
    if kernel > size:
        raise ValueError(f"VALID padding: kernel {kernel} is larger than the input size {size}")
    return (size - kernel) // stride + 1


def _resolve_reshape(old: tuple[int, ...], new: Sequence[int]) -> tuple[int, ...]:
    dims = [int(d) for d in new]
    size = math.prod(old)
    unknown = [i for i, d in enumerate(dims) if d == -1]
    if len(unknown) > 1 or any(d == 0 or d < -1 for d in dims):
        raise ValueError(f"reshape: bad target shape {tuple(new)} (positive dims and at most one -1)")
    if unknown:
        known = math.prod(d for d in dims if d != -1)
        if size % known:
            raise ValueError(f"reshape: cannot reshape {old} to {tuple(new)}")
        dims[unknown[0]] = size // known
    if math.prod(dims) != size:
        raise ValueError(f"reshape: cannot reshape {old} ({size} elements) to {tuple(new)}")
    return tuple(dims)


# -- serialisation --------------------------------------------------------------------

_TENSOR_TYPES = {
    FLOAT32: tflite.TensorType.FLOAT32,
    INT8: tflite.TensorType.INT8,
    INT32: tflite.TensorType.INT32,
}
_ACTIVATION_CODES = {
    "NONE": tflite.ActivationFunctionType.NONE,
    "RELU": tflite.ActivationFunctionType.RELU,
    "RELU6": tflite.ActivationFunctionType.RELU6,
}
_PADDING_CODES = {"SAME": tflite.Padding.SAME, "VALID": tflite.Padding.VALID}
# Versions from TFLite's op version table (tools/versioning/op_version.cc): the float
# kernels are version 1; the full-integer int8 kernels need these. A runtime refuses
# a version it does not know, so never write a higher one than the op needs.
_INT8_VERSIONS = {
    "CONV_2D": 3,
    "DEPTHWISE_CONV_2D": 3,
    "FULLY_CONNECTED": 4,
    "ADD": 2,
    "SOFTMAX": 2,
    "RELU": 2,
    "RELU6": 2,
    "RESHAPE": 1,
}


def op_version(op: OpDef, graph: Graph) -> int:
    """The builtin operator version this op needs, from its input dtype."""
    if op.kind == "CUSTOM":
        return 1
    first = graph.tensors[op.inputs[0]].dtype
    return _INT8_VERSIONS[op.kind] if first == INT8 else 1


def serialize(graph: Graph) -> bytes:
    """Write ``graph`` as a TFLite model (schema version 3, file identifier "TFL3")."""
    payload_size = sum(t.data.nbytes for t in graph.tensors if t.data is not None)
    fb = flatbuffers.Builder(payload_size + 64 * 1024)

    # Buffer 0 is the schema's empty sentinel that every activation tensor points at.
    buffer_index: list[int] = []
    buffers = [_buffer(fb, None)]
    for t in graph.tensors:
        if t.data is None:
            buffer_index.append(0)
        else:
            buffer_index.append(len(buffers))
            buffers.append(_buffer(fb, np.ascontiguousarray(t.data).astype(t.data.dtype.newbyteorder("<")).tobytes()))

    tensors = [_tensor(fb, t, buffer_index[i]) for i, t in enumerate(graph.tensors)]

    codes: dict[tuple[str, str | None, int], int] = {}
    op_code_index: list[int] = []
    for op in graph.ops:
        key = (op.kind, op.custom_code, op_version(op, graph))
        op_code_index.append(codes.setdefault(key, len(codes)))
    code_offsets = [_operator_code(fb, kind, custom, version) for kind, custom, version in codes]
    operators = [_operator(fb, op, op_code_index[i]) for i, op in enumerate(graph.ops)]

    subgraph_name = fb.CreateString("main")
    tensors_vec = _offset_vector(fb, tensors)
    inputs_vec = fb.CreateNumpyVector(np.asarray(graph.inputs, dtype=np.int32))
    outputs_vec = fb.CreateNumpyVector(np.asarray(graph.outputs, dtype=np.int32))
    operators_vec = _offset_vector(fb, operators)
    tflite.SubGraphStart(fb)
    tflite.SubGraphAddTensors(fb, tensors_vec)
    tflite.SubGraphAddInputs(fb, inputs_vec)
    tflite.SubGraphAddOutputs(fb, outputs_vec)
    tflite.SubGraphAddOperators(fb, operators_vec)
    tflite.SubGraphAddName(fb, subgraph_name)
    subgraph = tflite.SubGraphEnd(fb)

    signature = _signature(fb, graph)
    description = fb.CreateString(graph.description)
    codes_vec = _offset_vector(fb, code_offsets)
    subgraphs_vec = _offset_vector(fb, [subgraph])
    buffers_vec = _offset_vector(fb, buffers)
    signatures_vec = _offset_vector(fb, [signature])
    tflite.ModelStart(fb)
    tflite.ModelAddVersion(fb, SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(fb, codes_vec)
    tflite.ModelAddSubgraphs(fb, subgraphs_vec)
    tflite.ModelAddDescription(fb, description)
    tflite.ModelAddBuffers(fb, buffers_vec)
    tflite.ModelAddSignatureDefs(fb, signatures_vec)
    model = tflite.ModelEnd(fb)
    fb.Finish(model, file_identifier=FILE_IDENTIFIER)
    return bytes(fb.Output())


def _offset_vector(fb: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    fb.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        fb.PrependUOffsetTRelative(off)
    return fb.EndVector()


def _buffer(fb: flatbuffers.Builder, payload: bytes | None) -> int:
    data = None
    if payload:
        fb.StartVector(1, len(payload), _BUFFER_ALIGNMENT)
        fb.head -= len(payload)
        fb.Bytes[fb.head : fb.head + len(payload)] = payload
        data = fb.EndVector()
    tflite.BufferStart(fb)
    if data is not None:
        tflite.BufferAddData(fb, data)
    return tflite.BufferEnd(fb)


def _quantization(fb: flatbuffers.Builder, quant: Quant) -> int:
    scale = fb.CreateNumpyVector(quant.scales.astype(np.float32))
    zero_point = fb.CreateNumpyVector(quant.zero_points.astype(np.int64))
    tflite.QuantizationParametersStart(fb)
    tflite.QuantizationParametersAddScale(fb, scale)
    tflite.QuantizationParametersAddZeroPoint(fb, zero_point)
    tflite.QuantizationParametersAddQuantizedDimension(fb, quant.axis)
    return tflite.QuantizationParametersEnd(fb)


def _tensor(fb: flatbuffers.Builder, t: TensorDef, buffer: int) -> int:
    name = fb.CreateString(t.name)
    shape = fb.CreateNumpyVector(np.asarray(t.shape, dtype=np.int32))
    quant = _quantization(fb, t.quant) if t.quant is not None else None
    tflite.TensorStart(fb)
    tflite.TensorAddShape(fb, shape)
    tflite.TensorAddType(fb, _TENSOR_TYPES[t.dtype])
    tflite.TensorAddBuffer(fb, buffer)
    tflite.TensorAddName(fb, name)
    if quant is not None:
        tflite.TensorAddQuantization(fb, quant)
    return tflite.TensorEnd(fb)


def _operator_code(fb: flatbuffers.Builder, kind: str, custom: str | None, version: int) -> int:
    code = getattr(tflite.BuiltinOperator, kind)
    # Old readers only know the int8 field; codes past 127 live only in the int32 one.
    deprecated = min(code, tflite.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
    custom_off = fb.CreateString(custom) if custom is not None else None
    tflite.OperatorCodeStart(fb)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(fb, deprecated)
    tflite.OperatorCodeAddBuiltinCode(fb, code)
    tflite.OperatorCodeAddVersion(fb, version)
    if custom_off is not None:
        tflite.OperatorCodeAddCustomCode(fb, custom_off)
    return tflite.OperatorCodeEnd(fb)


def _operator(fb: flatbuffers.Builder, op: OpDef, opcode_index: int) -> int:
    options_type, options = _builtin_options(fb, op)
    inputs = fb.CreateNumpyVector(np.asarray(op.inputs, dtype=np.int32))
    outputs = fb.CreateNumpyVector(np.asarray(op.outputs, dtype=np.int32))
    tflite.OperatorStart(fb)
    tflite.OperatorAddOpcodeIndex(fb, opcode_index)
    tflite.OperatorAddInputs(fb, inputs)
    tflite.OperatorAddOutputs(fb, outputs)
    if options is not None:
        tflite.OperatorAddBuiltinOptionsType(fb, options_type)
        tflite.OperatorAddBuiltinOptions(fb, options)
    return tflite.OperatorEnd(fb)


def _builtin_options(fb: flatbuffers.Builder, op: OpDef) -> tuple[int, int | None]:
    """Write the op's options table; returns (BuiltinOptions union type, offset)."""
    o = op.options
    kinds = tflite.BuiltinOptions
    if op.kind == "CONV_2D":
        tflite.Conv2DOptionsStart(fb)
        tflite.Conv2DOptionsAddPadding(fb, _PADDING_CODES[o["padding"]])
        tflite.Conv2DOptionsAddStrideH(fb, o["stride"][0])
        tflite.Conv2DOptionsAddStrideW(fb, o["stride"][1])
        tflite.Conv2DOptionsAddFusedActivationFunction(fb, _ACTIVATION_CODES[o["activation"]])
        tflite.Conv2DOptionsAddDilationHFactor(fb, 1)
        tflite.Conv2DOptionsAddDilationWFactor(fb, 1)
        return kinds.Conv2DOptions, tflite.Conv2DOptionsEnd(fb)
    if op.kind == "DEPTHWISE_CONV_2D":
        tflite.DepthwiseConv2DOptionsStart(fb)
        tflite.DepthwiseConv2DOptionsAddPadding(fb, _PADDING_CODES[o["padding"]])
        tflite.DepthwiseConv2DOptionsAddStrideH(fb, o["stride"][0])
        tflite.DepthwiseConv2DOptionsAddStrideW(fb, o["stride"][1])
        tflite.DepthwiseConv2DOptionsAddDepthMultiplier(fb, o["depth_multiplier"])
        tflite.DepthwiseConv2DOptionsAddFusedActivationFunction(fb, _ACTIVATION_CODES[o["activation"]])
        tflite.DepthwiseConv2DOptionsAddDilationHFactor(fb, 1)
        tflite.DepthwiseConv2DOptionsAddDilationWFactor(fb, 1)
        return kinds.DepthwiseConv2DOptions, tflite.DepthwiseConv2DOptionsEnd(fb)
    if op.kind == "FULLY_CONNECTED":
        tflite.FullyConnectedOptionsStart(fb)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(fb, _ACTIVATION_CODES[o["activation"]])
        tflite.FullyConnectedOptionsAddWeightsFormat(fb, tflite.FullyConnectedOptionsWeightsFormat.DEFAULT)
        tflite.FullyConnectedOptionsAddKeepNumDims(fb, False)
        return kinds.FullyConnectedOptions, tflite.FullyConnectedOptionsEnd(fb)
    if op.kind == "ADD":
        tflite.AddOptionsStart(fb)
        tflite.AddOptionsAddFusedActivationFunction(fb, _ACTIVATION_CODES[o["activation"]])
        return kinds.AddOptions, tflite.AddOptionsEnd(fb)
    if op.kind == "RESHAPE":
        new_shape = fb.CreateNumpyVector(np.asarray(o["new_shape"], dtype=np.int32))
        tflite.ReshapeOptionsStart(fb)
        tflite.ReshapeOptionsAddNewShape(fb, new_shape)
        return kinds.ReshapeOptions, tflite.ReshapeOptionsEnd(fb)
    if op.kind == "SOFTMAX":
        tflite.SoftmaxOptionsStart(fb)
        tflite.SoftmaxOptionsAddBeta(fb, o["beta"])
        return kinds.SoftmaxOptions, tflite.SoftmaxOptionsEnd(fb)
    if op.kind in ("RELU", "RELU6", "CUSTOM"):
        return kinds.NONE, None
    raise ValueError(f"serialize: no writer for op kind {op.kind!r}")


def _signature(fb: flatbuffers.Builder, graph: Graph) -> int:
    """One "serving_default" signature naming every input and output tensor."""

    def tensor_maps(indices: tuple[int, ...]) -> int:
        maps = []
        for i in indices:
            name = fb.CreateString(graph.tensors[i].name)
            tflite.TensorMapStart(fb)
            tflite.TensorMapAddName(fb, name)
            tflite.TensorMapAddTensorIndex(fb, i)
            maps.append(tflite.TensorMapEnd(fb))
        return _offset_vector(fb, maps)

    inputs = tensor_maps(graph.inputs)
    outputs = tensor_maps(graph.outputs)
    key = fb.CreateString(SIGNATURE_KEY)
    tflite.SignatureDefStart(fb)
    tflite.SignatureDefAddInputs(fb, inputs)
    tflite.SignatureDefAddOutputs(fb, outputs)
    tflite.SignatureDefAddSignatureKey(fb, key)
    tflite.SignatureDefAddSubgraphIndex(fb, 0)
    return tflite.SignatureDefEnd(fb)
