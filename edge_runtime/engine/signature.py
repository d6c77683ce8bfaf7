"""A model's input/output signature, and checking a call's tensors against it.

Every message names what was expected and what arrived, so a caller can fix the call
without reading our source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from edge_runtime.errors import InputError

Feeds = Union[Mapping[str, Any], Sequence[Any], np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    index: int
    shape: tuple[int, ...]
    dtype: np.dtype
    # Per-tensor affine quantization (scale, zero_point); (0.0, 0) when float.
    scale: float = 0.0
    zero_point: int = 0

    def describe(self) -> str:
        return f"{self.name} {self.dtype.name}{list(self.shape)}"

    def to_dict(self, *, with_index: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape)}
        if self.scale:
            out["quantization"] = {"scale": self.scale, "zero_point": self.zero_point}
        if with_index:
            out["index"] = self.index
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        q = d.get("quantization") or {}
        return cls(name=str(d["name"]), index=int(d.get("index", -1)), shape=tuple(int(x) for x in d["shape"]),
                   dtype=np.dtype(d["dtype"]), scale=float(q.get("scale", 0.0)), zero_point=int(q.get("zero_point", 0)))


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, interpreter: Any) -> Signature:
        return cls(
            inputs=tuple(_spec(d) for d in interpreter.get_input_details()),
            outputs=tuple(_spec(d) for d in interpreter.get_output_details()),
        )

    def to_dict(self, *, with_index: bool = False) -> dict[str, Any]:
        return {"inputs": [s.to_dict(with_index=with_index) for s in self.inputs],
                "outputs": [s.to_dict(with_index=with_index) for s in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Signature:
        return cls(inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]))

    def expected(self) -> str:
        return ", ".join(s.describe() for s in self.inputs)

    def zeros(self) -> list[np.ndarray]:
        return [np.zeros(s.shape, dtype=s.dtype) for s in self.inputs]

    def feeds(self, inputs: Feeds, *, coerce: bool = False) -> list[np.ndarray]:
        """Order and check ``inputs`` against this signature; return one array per input.

        ``inputs`` is a mapping by name, a sequence in input order, or (single-input models)
        one array. With ``coerce`` (JSON callers, whose numbers carry no dtype) values are
        converted to the expected dtype when that loses nothing; otherwise dtypes must match.

        Raises:
            InputError: a name is unknown or missing, or a shape or dtype differs.
        """
        if isinstance(inputs, Mapping):
            unknown = [k for k in inputs if k not in {s.name for s in self.inputs}]
            if unknown:
                raise InputError(
                    f"unknown input {', '.join(repr(u) for u in unknown)}; expected {self.expected()}"
                )
            missing = [s.name for s in self.inputs if s.name not in inputs]
            if missing:
                raise InputError(
                    f"missing input {', '.join(repr(m) for m in missing)}; expected {self.expected()}"
                )
            values = [inputs[s.name] for s in self.inputs]
        elif isinstance(inputs, np.ndarray) or not isinstance(inputs, Sequence):
            if len(self.inputs) != 1:
                raise InputError(
                    f"got one unnamed tensor but the model has {len(self.inputs)} inputs; "
                    f"pass them by name: {self.expected()}"
                )
            values = [inputs]
        else:
            if len(inputs) != len(self.inputs):
                raise InputError(f"got {len(inputs)} tensors, expected {len(self.inputs)}: {self.expected()}")
            values = list(inputs)
        return [_check(spec, value, coerce) for spec, value in zip(self.inputs, values)]


def _spec(detail: Mapping[str, Any]) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0)) or (0.0, 0)
    return TensorSpec(
        name=str(detail["name"]),
        index=int(detail["index"]),
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]),
        scale=float(scale),
        zero_point=int(zero_point),
    )


def _check(spec: TensorSpec, value: Any, coerce: bool) -> np.ndarray:
    if isinstance(value, np.ndarray) and not coerce:
        arr = value
        if arr.dtype != spec.dtype:
            raise InputError(
                f"input {spec.name!r}: expected dtype {spec.dtype.name}, got {arr.dtype.name}"
            )
    else:
        arr = _coerce(spec, value)
    if arr.shape != spec.shape:
        raise InputError(
            f"input {spec.name!r}: expected shape {list(spec.shape)}, got {list(arr.shape)}"
        )
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _coerce(spec: TensorSpec, value: Any) -> np.ndarray:
    try:
        raw = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"input {spec.name!r}: not a rectangular array of numbers ({exc})") from exc
    if raw.dtype == object or raw.dtype.kind not in "biuf":
        raise InputError(
            f"input {spec.name!r}: expected numbers of dtype {spec.dtype.name}, got {raw.dtype.name} values"
        )
    if raw.dtype == spec.dtype:
        return raw
    if spec.dtype.kind in "iu":
        if raw.dtype.kind == "f" and not np.all(np.isfinite(raw) & (raw == np.round(raw))):
            raise InputError(f"input {spec.name!r}: expected integers ({spec.dtype.name}), got fractional values")
        info = np.iinfo(spec.dtype)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise InputError(
                f"input {spec.name!r}: values must lie in [{info.min}, {info.max}] for {spec.dtype.name}"
            )
    elif spec.dtype.kind == "b" and raw.dtype.kind != "b":
        raise InputError(f"input {spec.name!r}: expected booleans, got {raw.dtype.name}")
    elif spec.dtype.kind == "f" and raw.size:
        # Finite values that would become inf in the model's precision are refused. NaN
        # and inf themselves pass through, as TF Serving lets them (a model may want them).
        finite = raw[np.isfinite(raw)] if raw.dtype.kind == "f" else raw
        limit = np.finfo(spec.dtype).max
        if finite.size and (np.max(finite) > limit or np.min(finite) < -limit):
            raise InputError(f"input {spec.name!r}: values beyond the {spec.dtype.name} range (±{limit:.3g})")
    return raw.astype(spec.dtype)
