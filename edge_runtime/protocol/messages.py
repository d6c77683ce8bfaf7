"""Every message of the fleet protocol as a pydantic model, and the one way in and out.

``decode(kind, payload)`` turns received bytes into a model or raises ``ProtocolError``,
and nothing else, whatever the bytes; ``encode(model)`` turns a model into the bytes to
publish. The topics they travel on are ``topics``' business; the signatures around the
signed ones are ``dsse``'s and ``trust``'s (``trust`` verifies an envelope, then parses its
payload with the model given here for its kind). No I/O here.

    kind            model            signed (DSSE)  form              limit
    state           DeviceState      -              JSON              64 KiB
    desired         DesiredState     deploy         JSON              SIGNED_BODY_LIMIT (189 KiB)
    manifest        Manifest         deploy         JSON              128 KiB
    command         Command          command        JSON              16 KiB
    root            signed.Root      root           JSON              64 KiB
    reply           Reply            -              JSON              64 KiB
    event           Event            -              JSON              16 KiB
    telemetry       Telemetry        -              JSON              64 KiB
    chunk_request   ChunkRequest     -              JSON              2 KiB
    chunk           ChunkResponse    -              EFC1 binary       256 KiB data + 8 KiB header
    infer_request   InferRequest     -              EFT1 binary       16 MiB
    infer_response  InferResponse    -              EFT1 binary       16 MiB
    ctl_state       ControllerState  -              JSON              4 KiB
    api_request     ApiRequest       -              JSON              64 KiB
    api_response    ApiResponse      -              JSON              4 MiB

Binary forms (bulk bytes never go through JSON or base64):

    chunk   := b"EFC1" u32 header_len header data       header: ChunkResponse as JSON
    tensors := an ``api.framing`` frame: b"EFT1" u32 header_len u32 n header (u64 len, .npy)*n

Versions (``spec_version`` = "MAJOR.MINOR", ours is ``signed.SPEC_VERSION``): another
MAJOR is refused (``unsupported_version``). A higher MINOR of an unsigned message is read
with its unknown fields dropped (a newer device still reports to an older controller);
at our own minor an unknown field is ``malformed``. Signed bodies never drop anything: a
signed field we do not understand is ``malformed`` (``signed.Strict``). A minor version
may only add optional fields; new enum values or changed meanings need a new major.

    1.0   the first version
    1.1   telemetry: ``ModelFigures.demand_rate`` (the calls a device's own API received)

Errors:

    ProtocolError (ValueError)     .reason: malformed | too_large | unsupported_version
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Union

import numpy as np
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from edge_runtime.protocol import topics
from edge_runtime.protocol.dsse import MAX_ENVELOPE_BYTES
from edge_runtime.protocol.signed import (
    SPEC_MAJOR,
    SPEC_VERSION,
    CommandHeader,
    DesiredHeader,
    Root,
    SignedBody,
    Strict,
)

if TYPE_CHECKING:
    from edge_runtime.engine.signature import Signature
    from edge_runtime.health import HealthCheck

SPEC_MINOR = int(SPEC_VERSION.split(".")[1])
_SPEC_RE = re.compile(r"^([0-9]{1,6})\.([0-9]{1,6})$")

KiB = 1024
MiB = 1024 * KiB
# A signed body is base64'd inside its envelope (4/3) next to its signatures; bodies up to
# this size leave room for a dozen signatures under dsse.MAX_ENVELOPE_BYTES.
SIGNED_BODY_LIMIT = (MAX_ENVELOPE_BYTES - 4 * KiB) * 3 // 4
MAX_CHUNK_BYTES = 256 * KiB
MAX_BINARY_HEADER = 8 * KiB
MAX_TENSOR_PAYLOAD = 16 * MiB
# Health-check samples ride inline in the signed manifest; keep them small.
MAX_HEALTH_BYTES = 64 * KiB
MAX_ARTIFACT_BYTES = 4 * 1024 * MiB

LIMITS: dict[str, int] = {
    "state": 64 * KiB,
    "desired": SIGNED_BODY_LIMIT,
    "manifest": 128 * KiB,
    "command": 16 * KiB,
    "root": 64 * KiB,
    "reply": 64 * KiB,
    "event": 16 * KiB,
    "telemetry": 64 * KiB,
    "chunk_request": 2 * KiB,
    "chunk": MAX_CHUNK_BYTES + MAX_BINARY_HEADER,
    "infer_request": MAX_TENSOR_PAYLOAD,
    "infer_response": MAX_TENSOR_PAYLOAD,
    "ctl_state": 4 * KiB,
    "api_request": 64 * KiB,
    "api_response": 4 * MiB,
}
SIGNED_KINDS = frozenset({"desired", "manifest", "command", "root"})
BINARY_KINDS = frozenset({"chunk", "infer_request", "infer_response"})

CHUNK_MAGIC = b"EFC1"
TENSOR_MAGIC = b"EFT1"  # api.framing.MAGIC: tensor messages are fast-path frames
MAX_TENSORS = 64  # api.framing.MAX_TENSORS
_CHUNK_PREFIX = struct.Struct("<4sI")
_FRAME_PREFIX = struct.Struct("<4sII")  # api.framing's prefix
_U64 = struct.Struct("<Q")


def _framing() -> Any:
    """``api.framing``, the .npy codec shared with the fast path, imported on first use:
    importing ``edge_runtime.api`` loads the API servers, which will themselves use this
    module to forward calls (a cycle at import time), and the controller needs none of it."""
    from edge_runtime.api import framing

    return framing


class ProtocolError(ValueError):
    """Received bytes that are not a message we accept; ``reason`` says which way.

    ``malformed`` (not JSON, wrong shape, a value out of range), ``too_large`` (over the
    kind's limit), ``unsupported_version`` (another major ``spec_version``). The reasons
    are a subset of ``REASONS``, so a handler can report one in an ``Event`` as is.
    """

    REASONS = ("malformed", "too_large", "unsupported_version")

    def __init__(self, reason: str, message: str, *, kind: Optional[str] = None) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown ProtocolError reason {reason!r}")
        super().__init__(f"{kind + ': ' if kind else ''}{message}")
        self.reason = reason
        self.kind = kind


# -- shared vocabulary -------------------------------------------------------------------

ID_PATTERN = topics.ID_PATTERN
# Same rules as the store's (store/state.py), so anything the wire names can be installed.
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
TOKEN_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"

Id = Annotated[str, Field(pattern=ID_PATTERN)]
Version = Annotated[str, Field(pattern=VERSION_PATTERN)]
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]
Token = Annotated[str, Field(pattern=TOKEN_PATTERN)]
Text = Annotated[str, Field(max_length=2000)]
TensorName = Annotated[str, Field(min_length=1, max_length=256)]
Count = Annotated[int, Field(ge=0)]
Millis = Annotated[float, Field(ge=0)]
# Where a model executes: "local", or the id of the executor node ("local" is reserved).
Route = Annotated[str, Field(pattern=ID_PATTERN)]
LOCAL = "local"

TRUST_REASONS: tuple[str, ...] = (
    "bad_signature", "threshold", "unknown_key", "rollback", "expired",
    "wrong_device", "hash_mismatch", "too_large", "malformed",
)
# The InstallError.reason tokens of errors.py.
INSTALL_REASONS: tuple[str, ...] = (
    "invalid_model", "quota_exceeded", "load_failed", "health_check_failed", "crash_loop",
    "invalid_request", "install_in_progress", "version_conflict", "no_download",
    "interrupted",  # a restart cut an install short, or a download no longer desired was given up
)
TRANSFER_REASONS: tuple[str, ...] = ("transfer_timeout", "transfer_failed", "artifact_not_found", "cancelled")
SERVING_REASONS: tuple[str, ...] = (
    "executor_unreachable", "deadline_exceeded", "busy", "model_not_found", "model_unavailable", "invalid_input",
)
REASONS: tuple[str, ...] = tuple(
    dict.fromkeys(TRUST_REASONS + ("unsupported_version",) + INSTALL_REASONS + TRANSFER_REASONS
                  + SERVING_REASONS + ("internal",))
)
Reason = Literal[REASONS]  # type: ignore[valid-type]

STEPS: tuple[str, ...] = (
    # the install state machine (store/state.py INSTALL_STATES) ...
    "downloading", "verifying", "staged", "loading", "health_check", "active", "rolled_back",
    # ... and what else a device reports
    "refused",  # an install refused before it changed anything
    "rejected",  # a document refused by trust or decode (reason says why)
    "removed",  # a model no longer desired was unloaded
    "routed",  # a model's route changed (local <-> a node)
    "fallback",  # a remote call ran locally because the executor did not answer
    "reconciled",  # the device now runs its desired generation
    "root_rotated",  # the device now trusts a newer root (figures: from_version, to_version)
)
Step = Literal[STEPS]  # type: ignore[valid-type]
_STEPS_WITH_REASON = frozenset({"refused", "rejected", "rolled_back", "fallback"})
InstallState = Literal["downloading", "verifying", "staged", "loading", "health_check", "active", "rolled_back"]

DTYPES: tuple[str, ...] = (
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64",
)
DType = Literal[DTYPES]  # type: ignore[valid-type]

COMMANDS: tuple[str, ...] = ("ping", "cancel", "diagnostics", "set-config", "restart")
CommandName = Literal[COMMANDS]  # type: ignore[valid-type]

API_ERRORS: tuple[str, ...] = (
    "bad_request", "unknown_method", "not_found", "conflict", "forbidden", "unavailable",
    "timeout", "internal", "malformed", "too_large", "unsupported_version",
)
ApiErrorType = Literal[API_ERRORS]  # type: ignore[valid-type]

_FORWARD = "forward_compatible"


# -- bases -------------------------------------------------------------------------------


class Part(BaseModel):
    """Any piece of an unsigned message: immutable, no NaN, unknown fields refused --
    except when ``decode`` reads a newer minor version, which drops them at every level."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown(cls, data: Any, info: ValidationInfo) -> Any:
        if info.context and info.context.get(_FORWARD) and isinstance(data, dict):
            return {k: v for k, v in data.items() if k in cls.model_fields}
        return data


class Message(Part):
    """A whole unsigned message: carries its ``spec_version``."""

    spec_version: str = Field(default=SPEC_VERSION, pattern=_SPEC_RE.pattern)

    @model_validator(mode="after")
    def _known_major(self) -> Message:
        if int(self.spec_version.split(".")[0]) != SPEC_MAJOR:
            raise ValueError(f"unsupported spec_version {self.spec_version!r}; this runtime speaks {SPEC_MAJOR}.x")
        return self


class SignedPart(Strict):
    """A piece of a signed body: ``signed.Strict`` (unknown fields refused), no NaN."""

    model_config = ConfigDict(allow_inf_nan=False)


# -- tensors, signatures, health checks, manifests (signed) -------------------------------


class InlineTensor(SignedPart):
    """A small tensor inside a JSON document: ``{"dtype", "shape", "data"}`` (values flat,
    row-major) or ``{"npy": base64 of a .npy file}`` (exact bits, NaN included); at most
    ``MAX_HEALTH_BYTES`` of raw data, only ``DTYPES``."""

    dtype: Optional[DType] = None
    shape: Optional[list[Annotated[int, Field(ge=0)]]] = Field(default=None, max_length=8)
    data: Optional[list[Union[StrictBool, StrictInt, StrictFloat]]] = Field(default=None, max_length=MAX_HEALTH_BYTES)
    npy: Optional[str] = Field(default=None, max_length=(MAX_HEALTH_BYTES + 4 * KiB) * 4 // 3 + 4)

    @model_validator(mode="after")
    def _one_form(self) -> InlineTensor:
        listed = (self.dtype, self.shape, self.data)
        if self.npy is not None:
            if any(x is not None for x in listed):
                raise ValueError("a tensor is either {dtype, shape, data} or {npy}, not both")
        elif any(x is None for x in listed):
            raise ValueError("a tensor needs dtype, shape and data (or npy)")
        try:
            self.to_array()  # every check happens here, so to_array() never fails later
        except ValueError:
            raise
        except Exception as exc:  # numpy raises OverflowError, TypeError...; pydantic only wraps ValueError
            raise ValueError(f"not a valid tensor: {type(exc).__name__}: {exc}") from exc
        return self

    @property
    def nbytes(self) -> int:
        """Raw size: data bytes of the list form, the whole .npy of the npy form."""
        if self.npy is not None:
            return len(self.npy) * 3 // 4
        return len(self.data or ()) * np.dtype(self.dtype).itemsize

    def to_array(self) -> np.ndarray:
        """The tensor as a numpy array.

        Raises:
            ValueError: the form does not describe a valid tensor (only while validating;
                a constructed model always converts).
        """
        if self.npy is not None:
            return _npy_from_b64(self.npy)
        dtype, shape, data = np.dtype(self.dtype), tuple(self.shape or ()), self.data or []
        if math.prod(shape) != len(data):
            raise ValueError(f"shape {list(shape)} holds {math.prod(shape)} values, data has {len(data)}")
        if len(data) * dtype.itemsize > MAX_HEALTH_BYTES:
            raise ValueError(f"inline tensor of {len(data) * dtype.itemsize} bytes exceeds {MAX_HEALTH_BYTES}")
        return _convert(data, dtype).reshape(shape)

    @classmethod
    def of(cls, array: Any, *, npy: bool = False) -> InlineTensor:
        """An inline tensor holding ``array`` (as a list unless ``npy``).

        Raises:
            ValueError: an unsupported dtype, or bigger than ``MAX_HEALTH_BYTES``.
        """
        arr = np.asarray(array)
        if arr.dtype.name not in DTYPES:
            raise ValueError(f"dtype {arr.dtype} cannot go on the wire; use one of {', '.join(DTYPES)}")
        if npy:
            blob = _framing().npy_header(arr) + arr.tobytes(order="C")
            return cls(npy=base64.b64encode(blob).decode("ascii"))
        return cls(dtype=arr.dtype.name, shape=list(arr.shape), data=arr.ravel().tolist())


def _npy_from_b64(text: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"npy is not base64: {exc}") from exc
    if len(raw) > MAX_HEALTH_BYTES + 4 * KiB:
        raise ValueError(f".npy of {len(raw)} bytes exceeds {MAX_HEALTH_BYTES}")
    framing = _framing()
    try:
        arr = framing.decode_npy(bytearray(raw))
    except framing.FrameError as exc:
        raise ValueError(str(exc)) from exc
    if arr.dtype.name not in DTYPES:
        raise ValueError(f".npy dtype {arr.dtype} is not one of {', '.join(DTYPES)}")
    if arr.nbytes > MAX_HEALTH_BYTES:
        raise ValueError(f"inline tensor of {arr.nbytes} bytes exceeds {MAX_HEALTH_BYTES}")
    return arr


def _convert(data: list[Any], dtype: np.dtype) -> np.ndarray:
    """``data`` as ``dtype``, refusing anything that would not survive the conversion."""
    if dtype.kind == "b":
        if not all(isinstance(v, bool) for v in data):
            raise ValueError("bool tensor with non-boolean values")
        return np.array(data, dtype=dtype)
    if any(isinstance(v, bool) for v in data):
        raise ValueError(f"booleans in a {dtype.name} tensor")
    if dtype.kind in "iu":
        if not all(isinstance(v, int) for v in data):
            raise ValueError(f"non-integer values in a {dtype.name} tensor")
        info = np.iinfo(dtype)
        if data and (min(data) < info.min or max(data) > info.max):
            raise ValueError(f"values outside [{info.min}, {info.max}] for {dtype.name}")
        return np.array(data, dtype=dtype)
    arr = np.array(data, dtype=np.float64)
    if arr.size and not np.all(np.abs(arr) <= np.finfo(dtype).max):
        raise ValueError(f"values beyond the {dtype.name} range (or not finite)")
    return arr.astype(dtype)


class Quantization(SignedPart):
    scale: float = Field(ge=0)
    zero_point: int


class SignatureTensor(SignedPart):
    """One input or output, as ``engine.signature.TensorSpec.to_dict()`` writes it."""

    name: TensorName
    dtype: DType
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=16)
    quantization: Optional[Quantization] = None
    index: Optional[int] = None


class ModelSignature(SignedPart):
    """A model's inputs and outputs, as ``engine.signature.Signature.to_dict()`` writes it."""

    inputs: list[SignatureTensor] = Field(min_length=1, max_length=MAX_TENSORS)
    outputs: list[SignatureTensor] = Field(min_length=1, max_length=MAX_TENSORS)

    @model_validator(mode="after")
    def _distinct(self) -> ModelSignature:
        for side in ("inputs", "outputs"):
            names = [t.name for t in getattr(self, side)]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {side} names")
        return self

    @classmethod
    def of(cls, signature: Signature) -> ModelSignature:
        """From the engine's ``Signature`` (what ``inspect_model`` returns).

        Raises:
            pydantic.ValidationError: a dtype or name the wire cannot carry.
        """
        return cls.model_validate(signature.to_dict())

    def to_signature(self) -> Signature:
        """The engine's ``Signature``, for checking a call's tensors."""
        from edge_runtime.engine.signature import Signature  # the engine is heavy; only callers that run models need it

        return Signature.from_dict(self.model_dump(exclude_none=True))

    def spec(self, side: str, name: str) -> Optional[SignatureTensor]:
        return next((t for t in getattr(self, side) if t.name == name), None)


class HealthSpec(SignedPart):
    """The manifest's health block: what ``health.HealthCheck`` runs before activation."""

    inputs: dict[TensorName, InlineTensor] = Field(min_length=1, max_length=MAX_TENSORS)
    expected: Optional[dict[TensorName, InlineTensor]] = Field(default=None, max_length=MAX_TENSORS)
    atol: float = Field(default=1e-5, ge=0)
    rtol: float = Field(default=1e-4, ge=0)
    latency_budget_ms: Optional[float] = Field(default=None, gt=0)
    runs: int = Field(default=3, ge=1, le=100)

    @model_validator(mode="after")
    def _bounded(self) -> HealthSpec:
        total = sum(t.nbytes for t in self.inputs.values()) + sum(t.nbytes for t in (self.expected or {}).values())
        if total > MAX_HEALTH_BYTES:
            raise ValueError(f"health samples total {total} bytes, at most {MAX_HEALTH_BYTES}")
        return self

    @classmethod
    def of(
        cls,
        inputs: Mapping[str, Any],
        expected: Optional[Mapping[str, Any]] = None,
        *,
        atol: float = 1e-5,
        rtol: float = 1e-4,
        latency_budget_ms: Optional[float] = None,
        runs: int = 3,
        npy: bool = False,
    ) -> HealthSpec:
        """A health block from arrays by name.

        Raises:
            ValueError: unsupported dtypes, too big, or bad tolerances.
        """
        return cls(
            inputs={k: InlineTensor.of(v, npy=npy) for k, v in inputs.items()},
            expected=None if expected is None else {k: InlineTensor.of(v, npy=npy) for k, v in expected.items()},
            atol=atol, rtol=rtol, latency_budget_ms=latency_budget_ms, runs=runs,
        )

    def to_health_check(self) -> HealthCheck:
        """The ``health.HealthCheck`` the installer runs."""
        from edge_runtime.health import HealthCheck  # pulls in the engine; only the installer needs it

        return HealthCheck(
            inputs={k: t.to_array() for k, t in self.inputs.items()},
            expected=None if self.expected is None else {k: t.to_array() for k, t in self.expected.items()},
            atol=self.atol, rtol=self.rtol, latency_budget_ms=self.latency_budget_ms, runs=self.runs,
        )


class ModelManifest(SignedPart):
    """One model version as the controller released it. The device trusts the artifact's
    bytes through ``sha256`` and ``size`` only; a transfer past ``size`` stops at once."""

    name: Id
    version: Version
    sha256: Sha256
    size: int = Field(ge=1, le=MAX_ARTIFACT_BYTES)
    signature: ModelSignature
    health: Optional[HealthSpec] = None
    # Optional https:// mirrors (Range-resumable); MQTT chunks are always available.
    sources: list[Annotated[str, Field(pattern=r"^https://[^\s]{1,2040}$")]] = Field(default_factory=list,
                                                                                  max_length=4)

    @model_validator(mode="after")
    def _health_fits_signature(self) -> ModelManifest:
        if self.health is None:
            return self
        want = {t.name for t in self.signature.inputs}
        if set(self.health.inputs) != want:
            raise ValueError(f"health inputs {sorted(self.health.inputs)} must be exactly the model's {sorted(want)}")
        for side, tensors in (("inputs", self.health.inputs), ("outputs", self.health.expected or {})):
            for name, tensor in tensors.items():
                spec = self.signature.spec(side, name)
                if spec is None:
                    raise ValueError(f"health expects output {name!r}, which the model does not have")
                arr = tensor.to_array()
                if list(arr.shape) != spec.shape:
                    raise ValueError(f"health {side[:-1]} {name!r}: shape {list(arr.shape)}, model says {spec.shape}")
                if side == "inputs" and arr.dtype.name != spec.dtype:
                    raise ValueError(f"health input {name!r}: dtype {arr.dtype.name}, model says {spec.dtype}")
        return self


class Manifest(SignedBody, ModelManifest):
    """A standalone signed manifest (role ``deploy``): a release record, ``ModelManifest``'s
    fields next to the signed-body header."""

    type: Literal["manifest"] = "manifest"

    def content(self) -> ModelManifest:
        return ModelManifest.model_validate(self.model_dump(include=set(ModelManifest.model_fields)))


class ModelSpec(SignedPart):
    """What the device should hold and serve for one model name."""

    version: Version
    manifest: ModelManifest
    # "local" (serve it here) or the executor node to forward calls to.
    route: Route = LOCAL
    # Keep a copy on disk even when routed elsewhere, so calls fall back to it when the
    # executor is unreachable; without one such calls fail with model_unavailable.
    install: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.version != self.manifest.version:
            raise ValueError(f"version {self.version!r} but the manifest is {self.manifest.version!r}")
        if self.route == LOCAL and not self.install:
            raise ValueError("a model routed locally must be installed")
        return self


class DesiredState(DesiredHeader):
    """The signed desired state of one device (or group): every model it should run.
    Models absent here are unloaded. ``generation`` only grows (trust keeps the floor)."""

    models: dict[Id, ModelSpec] = Field(default_factory=dict, max_length=256)

    @model_validator(mode="after")
    def _names(self) -> DesiredState:
        for name, spec in self.models.items():
            if spec.manifest.name != name:
                raise ValueError(f"models[{name!r}] holds a manifest for {spec.manifest.name!r}")
        return self


# -- commands (signed) and replies -------------------------------------------------------


class PingArgs(SignedPart):
    pass


class CancelArgs(SignedPart):
    """Abort the transfer of one artifact, or every transfer for one model."""

    sha256: Optional[Sha256] = None
    model: Optional[Id] = None

    @model_validator(mode="after")
    def _one(self) -> CancelArgs:
        if (self.sha256 is None) == (self.model is None):
            raise ValueError("cancel names exactly one of sha256 or model")
        return self


class DiagnosticsArgs(SignedPart):
    log_lines: int = Field(default=100, ge=0, le=1000)


class SetConfigArgs(SignedPart):
    telemetry_interval_s: Optional[float] = Field(default=None, ge=1, le=3600)
    log_level: Optional[Literal["debug", "info", "warning", "error"]] = None

    @model_validator(mode="after")
    def _some(self) -> SetConfigArgs:
        if self.telemetry_interval_s is None and self.log_level is None:
            raise ValueError("set-config needs at least one setting")
        return self


class RestartArgs(SignedPart):
    reason: Optional[Text] = None


COMMAND_ARGS: dict[str, type[SignedPart]] = {
    "ping": PingArgs,
    "cancel": CancelArgs,
    "diagnostics": DiagnosticsArgs,
    "set-config": SetConfigArgs,
    "restart": RestartArgs,
}
CommandArgs = Union[PingArgs, CancelArgs, DiagnosticsArgs, SetConfigArgs, RestartArgs]


class Command(CommandHeader):
    """A signed one-shot command (role ``command``), executed at most once (``seq`` floor).
    ``args`` is typed by ``name`` (``COMMAND_ARGS``); on the wire it is a plain object."""

    name: CommandName
    args: CommandArgs = Field(default_factory=PingArgs)

    @model_validator(mode="before")
    @classmethod
    def _typed_args(cls, data: Any) -> Any:
        # Pick the args model by name, not by shape: {} is a valid PingArgs and RestartArgs.
        name = data.get("name") if isinstance(data, dict) else None
        if isinstance(name, str) and name in COMMAND_ARGS:
            args = data.get("args", {})
            if isinstance(args, dict):
                try:
                    return {**data, "args": COMMAND_ARGS[name].model_validate(args)}
                except ValidationError as exc:  # name the field: pydantic would report the inner path bare
                    raise ValueError(f"args of {name}: {_describe(exc)}") from None
        return data

    @model_validator(mode="after")
    def _args_match(self) -> Command:
        if type(self.args) is not COMMAND_ARGS[self.name]:
            raise ValueError(f"command {self.name!r} takes {COMMAND_ARGS[self.name].__name__}")
        return self


class ErrorInfo(Part):
    """A failure on the wire, shaped as ``errors.EdgeRuntimeError.to_dict()``.

    ``type`` is an error code (``errors.py``'s, e.g. ``model_not_found``); ``reason``
    refines it (e.g. an ``InstallError`` reason or a trust rejection).
    """

    type: Token
    message: Text = ""
    reason: Optional[Token] = None

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        """From any exception; ours keep their code and reason, others are ``internal``."""
        code = getattr(exc, "code", None)
        reason = getattr(exc, "reason", None)
        return cls(
            type=code if isinstance(code, str) and re.fullmatch(TOKEN_PATTERN, code) else "internal",
            message=str(exc)[:2000],
            reason=reason if isinstance(reason, str) and re.fullmatch(TOKEN_PATTERN, reason) else None,
        )

    def to_exception(self) -> Exception:
        """The ``errors.EdgeRuntimeError`` this describes (unknown codes -> the base class)."""
        from edge_runtime.errors import error_from_dict

        return error_from_dict(self.model_dump(exclude_none=True))


class Reply(Message):
    """A device's answer to one command: ``seq`` is the command's, absent when the command
    could not be read at all."""

    seq: Optional[Count] = None
    command: Optional[CommandName] = None
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: Optional[ErrorInfo] = None
    at: Optional[AwareDatetime] = None

    @model_validator(mode="after")
    def _outcome(self) -> Reply:
        if self.ok == (self.error is not None):
            raise ValueError("a reply is ok without an error, or not ok with one")
        return self


# -- device reports ----------------------------------------------------------------------


class Capabilities(Part):
    """What a node offers the placement planner."""

    cores: int = Field(ge=1, le=4096)
    memory_bytes: Count
    tier: Literal["edge", "cloud"] = "edge"
    backends: list[Token] = Field(default_factory=list, max_length=8)
    accelerator: Optional[Annotated[str, Field(max_length=64)]] = None
    disk_bytes: Optional[Count] = None
    arch: Optional[Annotated[str, Field(max_length=32)]] = None


class InstalledVersion(Part):
    version: Version
    sha256: Sha256
    size: Count


class InstallProgress(Part):
    version: Version
    state: InstallState
    progress: Optional[float] = Field(default=None, ge=0, le=1)


class InstalledModel(Part):
    """One model as the device holds it: the active version, what else is on disk, where
    calls go, and an install in progress."""

    active: Optional[Version] = None
    versions: list[InstalledVersion] = Field(default_factory=list, max_length=16)
    route: Route = LOCAL
    install: Optional[InstallProgress] = None


class DeviceState(Message):
    """Birth (``online``) and death (``online: false``, also the Last Will) of a device,
    and its reported state. Retained. ``bd_seq`` pairs a death with its birth (Sparkplug):
    a Will whose ``bd_seq`` is older than the current birth is stale."""

    online: bool
    boot_id: Id
    bd_seq: Count
    at: Optional[AwareDatetime] = None
    runtime_version: Optional[Annotated[str, Field(max_length=64)]] = None
    capabilities: Optional[Capabilities] = None
    models: dict[Id, InstalledModel] = Field(default_factory=dict, max_length=256)
    generation: Optional[Count] = None  # the desired generation it has reconciled
    groups: list[Id] = Field(default_factory=list, max_length=32)

    @model_validator(mode="after")
    def _birth(self) -> DeviceState:
        if self.online and (self.capabilities is None or self.runtime_version is None):
            raise ValueError("an online state (a birth) carries runtime_version and capabilities")
        return self


FigureValue = Union[bool, int, float, Annotated[str, Field(max_length=200)], None]


class Event(Message):
    """Progress, rejections, rollbacks, fallbacks. ``seq`` is a persisted per-device
    counter: (device, seq) identifies an event, so a redelivered one is counted once."""

    seq: Count
    at: AwareDatetime
    step: Step
    model: Optional[Id] = None
    version: Optional[Version] = None
    generation: Optional[Count] = None
    progress: Optional[float] = Field(default=None, ge=0, le=1)
    reason: Optional[Reason] = None
    detail: Optional[Text] = None
    figures: dict[Annotated[str, Field(max_length=64)], FigureValue] = Field(default_factory=dict, max_length=32)

    @model_validator(mode="after")
    def _reasoned(self) -> Event:
        if self.step in _STEPS_WITH_REASON and self.reason is None:
            raise ValueError(f"a {self.step!r} event needs a reason")
        return self


class SystemFigures(Part):
    cpu_percent: float = Field(ge=0, le=100)
    load_1m: Optional[float] = Field(default=None, ge=0)
    load_5m: Optional[float] = Field(default=None, ge=0)
    load_15m: Optional[float] = Field(default=None, ge=0)
    memory_total_bytes: Count
    memory_available_bytes: Count
    temperature_c: Optional[float] = Field(default=None, ge=-100, le=250)
    disk_free_bytes: Optional[Count] = None
    rss_bytes: Optional[Count] = None


class ModelFigures(Part):
    """One model's figures. Counters are cumulative since ``boot_id`` (so a controller
    takes differences and a lost message loses nothing); rates and percentiles cover the
    last interval. ``service_ms`` (mean time a call held an interpreter, not counting the
    wait for one), ``utilisation`` (busy fraction of the interpreter pool) and
    ``demand_rate`` feed the placement planner."""

    version: Optional[Version] = None
    route: Route = LOCAL
    calls: Count = 0
    errors: Count = 0
    fallbacks: Count = 0
    rate: float = Field(default=0.0, ge=0)
    # Since 1.1 (optional: absent from older agents, which a controller then reads the old
    # way, from ``rate``): calls per second of the interval that this device's own local API
    # (REST and fast path) received for the model, whatever served them -- the local engine,
    # the executor at ``route`` (``forwarded``), a local fallback, or none (a forward
    # failure). Calls it ran for other nodes (``served_for_peers``) are in ``rate``, not
    # here; calls refused for their inputs are in neither.
    demand_rate: Optional[float] = Field(default=None, ge=0)
    p50_ms: Optional[Millis] = None
    p95_ms: Optional[Millis] = None
    p99_ms: Optional[Millis] = None
    service_ms: Optional[Millis] = None
    utilisation: Optional[float] = Field(default=None, ge=0)
    # Remote inference, cumulative like calls (optional: absent reads as 0). As the caller:
    # calls forwarded to ``route`` that it answered, and those that failed with no local
    # copy to fall back to (``fallbacks`` counts the ones a local copy answered). As the
    # executor node: other nodes' calls it ran (also in ``calls``), refused as ``busy``
    # (queue full), and answered with another error.
    forwarded: Count = 0
    forward_failures: Count = 0
    served_for_peers: Count = 0
    peer_busy: Count = 0
    peer_errors: Count = 0


class OutboxFigures(Part):
    depth: Count = 0
    dropped: Count = 0


class Telemetry(Message):
    """Periodic figures. ``seq`` is persisted and only grows, even across restarts:
    (device, seq) identifies a sample, and gaps are what the outbox dropped."""

    seq: Count
    at: AwareDatetime
    boot_id: Optional[Id] = None
    interval_s: float = Field(gt=0, le=86400)
    uptime_s: Optional[float] = Field(default=None, ge=0)
    system: SystemFigures
    models: dict[Id, ModelFigures] = Field(default_factory=dict, max_length=256)
    broker_rtt_ms: Optional[Millis] = None
    # Round trip to each executor node this device forwards calls to, through the broker:
    # the caller's wait minus the executor's queue and compute time (mean of the interval's
    # calls, else the last one measured).
    peers_rtt_ms: dict[Id, Millis] = Field(default_factory=dict, max_length=256)
    outbox: OutboxFigures = Field(default_factory=OutboxFigures)


# -- artifact transfer -------------------------------------------------------------------


class ChunkRequest(Message):
    """Device -> chunk server: bytes [offset, offset + length) of artifact ``sha256``, to
    be sent to ``reply_to`` (the device's chunk inbox for that artifact)."""

    request_id: Id
    sha256: Sha256
    offset: Count
    length: int = Field(ge=1, le=MAX_CHUNK_BYTES)
    reply_to: str = Field(max_length=256)

    @model_validator(mode="after")
    def _reply_to_inbox(self) -> ChunkRequest:
        # The server publishes wherever this says: only ever into a chunk inbox.
        info = topics.parse(self.reply_to)
        if info.kind != "chunk_inbox" or info.sha256 != self.sha256:
            raise ValueError(f"reply_to must be a chunk inbox for {self.sha256[:12]}..., got {self.reply_to!r}")
        return self

    @property
    def device(self) -> str:
        """The requesting device (from ``reply_to``)."""
        return topics.parse(self.reply_to).device  # type: ignore[return-value]


class ChunkResponse(Message):
    """Chunk server -> device (binary ``EFC1``): the header, then exactly ``length`` raw
    bytes (``data``, not part of the JSON). ``size`` is the artifact's whole size as the
    server knows it. On ``error`` (e.g. ``artifact_not_found``) there are no bytes."""

    request_id: Id
    sha256: Sha256
    offset: Count
    length: int = Field(ge=0, le=MAX_CHUNK_BYTES)
    size: Optional[Count] = None
    error: Optional[ErrorInfo] = None
    data: bytes = Field(default=b"", exclude=True, repr=False)

    @model_validator(mode="after")
    def _lengths(self) -> ChunkResponse:
        if len(self.data) != self.length:
            raise ValueError(f"header says {self.length} bytes, {len(self.data)} follow")
        if self.error is not None and self.length:
            raise ValueError("an error response carries no bytes")
        if self.size is not None and self.offset + self.length > self.size:
            raise ValueError(f"bytes [{self.offset}, {self.offset + self.length}) run past the size {self.size}")
        return self

    @classmethod
    def answer(cls, request: ChunkRequest, data: bytes, *, size: int) -> ChunkResponse:
        """The response carrying ``data`` for ``request``.

        Raises:
            pydantic.ValidationError: more data than a chunk may hold, or past ``size``.
        """
        return cls(request_id=request.request_id, sha256=request.sha256, offset=request.offset,
                   length=len(data), size=size, data=bytes(data))

    @classmethod
    def failure(cls, request: ChunkRequest, error: ErrorInfo) -> ChunkResponse:
        return cls(request_id=request.request_id, sha256=request.sha256, offset=request.offset, length=0, error=error)


# -- remote inference --------------------------------------------------------------------


class _Tensors(Message):
    """A message whose tensors travel as ``.npy`` after its JSON header (``EFT1``)."""

    names: Optional[list[TensorName]] = Field(default=None, max_length=MAX_TENSORS)
    tensors: tuple[Any, ...] = Field(default=(), exclude=True, repr=False, max_length=MAX_TENSORS)

    @model_validator(mode="after")
    def _tensors_named(self) -> _Tensors:
        for t in self.tensors:
            if not isinstance(t, np.ndarray) or t.dtype.name not in DTYPES:
                raise ValueError(f"tensors must be numpy arrays of {', '.join(DTYPES)}")
        if self.names is not None:
            if len(self.names) != len(self.tensors):
                raise ValueError(f"{len(self.names)} names for {len(self.tensors)} tensors")
            if len(set(self.names)) != len(self.names):
                raise ValueError("duplicate tensor names")
        return self

    def arrays(self) -> Union[dict[str, np.ndarray], list[np.ndarray]]:
        """The tensors by name, or in order when unnamed."""
        return dict(zip(self.names, self.tensors)) if self.names is not None else list(self.tensors)

    def __eq__(self, other: object) -> bool:  # numpy arrays have no truth value: compare them explicitly
        return (
            type(other) is type(self)
            and self.model_dump() == other.model_dump()  # type: ignore[union-attr]
            and len(self.tensors) == len(other.tensors)  # type: ignore[union-attr]
            and all(a.dtype == b.dtype and np.array_equal(a, b)
                    for a, b in zip(self.tensors, other.tensors))  # type: ignore[union-attr]
        )

    __hash__ = None  # type: ignore[assignment]


class InferRequest(_Tensors):
    """Caller -> executor node: run ``model`` on the tensors; answer on ``reply_to`` (the
    caller's infer inbox) with the same ``correlation_id``. ``deadline_ms`` is the caller's
    budget counted from sending; the executor drops a request that has waited longer (the
    caller has given up on it). ``names`` are input names (absent: inputs in order).
    Any runtime may publish into an infer inbox, so ``correlation_id`` must be unguessable
    (random) and the caller drops replies it is not waiting for."""

    correlation_id: Id
    model: Id
    version: Optional[Version] = None
    deadline_ms: int = Field(ge=1, le=600_000)
    reply_to: str = Field(max_length=256)

    @model_validator(mode="after")
    def _reply_to_inbox(self) -> InferRequest:
        if topics.parse(self.reply_to).kind != "infer_inbox":
            raise ValueError(f"reply_to must be an infer inbox, got {self.reply_to!r}")
        return self

    @property
    def caller(self) -> str:
        """The calling device (from ``reply_to``): the source of the workload."""
        return topics.parse(self.reply_to).device  # type: ignore[return-value]


class InferResponse(_Tensors):
    """Executor -> caller: the outputs by name, or an ``error`` (``errors.py`` codes,
    e.g. ``model_unavailable``, ``invalid_input``; ``busy`` when its queue is full)."""

    correlation_id: Id
    model: Id
    version: Optional[Version] = None
    error: Optional[ErrorInfo] = None
    compute_ms: Optional[Millis] = None
    queue_ms: Optional[Millis] = None

    @model_validator(mode="after")
    def _outcome(self) -> InferResponse:
        if self.error is not None and self.tensors:
            raise ValueError("an error response carries no tensors")
        return self


# -- controller and console --------------------------------------------------------------


class ControllerState(Message):
    """The controller's retained STATE (Sparkplug primary host), with a Last Will of
    ``online: false``: tells devices and consoles whether anyone is steering the fleet."""

    online: bool
    at: Optional[AwareDatetime] = None
    instance: Optional[Id] = None


class ApiError(ErrorInfo):
    type: ApiErrorType  # type: ignore[assignment]


class ApiRequest(Message):
    """fleetctl -> controller: ``method`` (e.g. ``devices.list``) with ``params``; the
    answer goes to ``reply_to`` (that console's api_reply topic)."""

    request_id: Id
    method: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31}){0,3}$")
    params: dict[Annotated[str, Field(max_length=64)], Any] = Field(default_factory=dict, max_length=64)
    reply_to: str = Field(max_length=256)
    deadline_ms: Optional[int] = Field(default=None, ge=1, le=600_000)

    @model_validator(mode="after")
    def _reply_to_console(self) -> ApiRequest:
        if topics.parse(self.reply_to).kind != "api_reply":
            raise ValueError(f"reply_to must be an api reply topic, got {self.reply_to!r}")
        return self


class ApiResponse(Message):
    request_id: Id
    ok: bool
    result: Any = None
    error: Optional[ApiError] = None

    @model_validator(mode="after")
    def _outcome(self) -> ApiResponse:
        if self.ok == (self.error is not None):
            raise ValueError("a response is ok without an error, or not ok with one")
        return self


# -- the way in and out ------------------------------------------------------------------

KINDS: dict[str, type[BaseModel]] = {
    "state": DeviceState,
    "desired": DesiredState,
    "manifest": Manifest,
    "command": Command,
    "root": Root,
    "reply": Reply,
    "event": Event,
    "telemetry": Telemetry,
    "chunk_request": ChunkRequest,
    "chunk": ChunkResponse,
    "infer_request": InferRequest,
    "infer_response": InferResponse,
    "ctl_state": ControllerState,
    "api_request": ApiRequest,
    "api_response": ApiResponse,
}
_KIND_OF: dict[type[BaseModel], str] = {model: kind for kind, model in KINDS.items()}
_BINARY_FIELD = {"chunk": "data", "infer_request": "tensors", "infer_response": "tensors"}


def kind_of(message: BaseModel) -> str:
    """The kind ``message`` is sent as.

    Raises:
        TypeError: not one of the protocol's message models.
    """
    try:
        return _KIND_OF[type(message)]
    except KeyError:
        raise TypeError(f"{type(message).__name__} is not a protocol message") from None


def decode(kind: str, payload: Union[bytes, bytearray, memoryview], *, max_bytes: Optional[int] = None) -> Any:
    """The ``KINDS[kind]`` model in ``payload``; the only way received bytes become a message.

    JSON must be strict: UTF-8, one object, no duplicate keys, no NaN or Infinity, no
    number that overflows a double. ``max_bytes`` overrides ``LIMITS[kind]``.

    Raises:
        ProtocolError: ``too_large`` (checked before anything is parsed), ``unsupported_version``
            (another major), ``malformed`` (everything else). Never any other exception
            for any payload.
        ValueError: ``kind`` is not one of ``KINDS`` (a caller's bug, not the payload's).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}; expected one of {', '.join(KINDS)}")
    limit = LIMITS[kind] if max_bytes is None else max_bytes
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError("malformed", f"payload is {type(payload).__name__}, not bytes", kind=kind)
    try:
        view = memoryview(payload).cast("B")
    except (TypeError, ValueError) as exc:
        raise ProtocolError("malformed", f"payload is not a flat byte buffer: {exc}", kind=kind) from exc
    if view.nbytes > limit:
        raise ProtocolError("too_large", f"payload of {view.nbytes} bytes exceeds {limit}", kind=kind)
    try:
        if kind in BINARY_KINDS:
            header_bytes, body = _split_chunk(view) if kind == "chunk" else _split_frame(view)
            header = strict_json(header_bytes)
            if not isinstance(header, dict):
                raise ProtocolError("malformed", "the JSON header must be an object", kind=kind)
            field = _BINARY_FIELD[kind]
            if field in header:
                raise ProtocolError("malformed", f"{field!r} belongs after the header, not in it", kind=kind)
            return _validate(kind, {**header, field: body})
        return _validate(kind, strict_json(view))
    except ProtocolError as exc:
        if exc.kind is None:  # raised below decode, which knows the kind
            raise ProtocolError(exc.reason, str(exc), kind=kind) from None
        raise
    except ValidationError as exc:
        raise ProtocolError("malformed", _describe(exc), kind=kind) from None
    except Exception as exc:  # JSON, struct, numpy and validators raise many types on junk: all malformed
        raise ProtocolError("malformed", f"{type(exc).__name__}: {exc}", kind=kind) from exc


def encode(message: BaseModel) -> bytes:
    """The bytes to publish for ``message``: compact JSON, or the binary form of
    chunks and tensor messages (JSON header, then raw bytes).

    Raises:
        ProtocolError: ``too_large`` when the bytes would exceed the kind's limit (the
            receiver would refuse them), ``malformed`` for a tensor that cannot be framed.
        TypeError: not a protocol message.
    """
    kind = kind_of(message)
    if kind == "chunk":
        header = message.model_dump_json(exclude_none=True).encode()
        _check_header(kind, len(header))
        out = _CHUNK_PREFIX.pack(CHUNK_MAGIC, len(header)) + header + message.data  # type: ignore[attr-defined]
    elif kind in BINARY_KINDS:
        framing = _framing()
        try:  # the fast path's frame layout, so one codec serves both
            parts = framing.encode(message.model_dump(mode="json", exclude_none=True), message.tensors)  # type: ignore[attr-defined]
        except framing.FrameError as exc:
            raise ProtocolError("malformed", str(exc), kind=kind) from exc
        _check_header(kind, len(parts[0]) - _FRAME_PREFIX.size)
        out = b"".join(parts)
    else:
        out = message.model_dump_json(exclude_none=True).encode()
    if len(out) > LIMITS[kind]:
        raise ProtocolError("too_large", f"{len(out)} bytes exceed the {LIMITS[kind]} a receiver accepts", kind=kind)
    return out


def _check_header(kind: str, size: int) -> None:
    if size > MAX_BINARY_HEADER:
        raise ProtocolError("too_large", f"header of {size} bytes exceeds {MAX_BINARY_HEADER}", kind=kind)


def _validate(kind: str, obj: Any) -> Any:
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("spec_version", SPEC_VERSION)
    match = _SPEC_RE.match(version) if isinstance(version, str) else None
    if match is None:
        raise ProtocolError("malformed", f"spec_version {version!r} is not MAJOR.MINOR")
    major, minor = int(match.group(1)), int(match.group(2))
    if major != SPEC_MAJOR:
        raise ProtocolError("unsupported_version", f"spec_version {version} (this runtime speaks {SPEC_MAJOR}.x)")
    # A newer minor of an unsigned message: read what we know, drop what we do not.
    forward = minor > SPEC_MINOR and kind not in SIGNED_KINDS
    return KINDS[kind].model_validate(obj, context={_FORWARD: True} if forward else None)


def strict_json(data: Union[bytes, memoryview]) -> Any:
    """The one JSON parser for everything that crosses the wire, signed bodies included:
    UTF-8 only, no duplicate keys, no NaN/Infinity, no float overflow.

    Raises:
        ProtocolError: ``malformed``.
    """
    try:
        return json.loads(
            bytes(data).decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError("malformed", f"not strict UTF-8 JSON: {exc}") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers that keep different duplicates read different documents from the same
    # signed bytes; refuse instead of choosing.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows a double")
    return value


def _split_chunk(view: memoryview) -> tuple[memoryview, bytes]:
    if view.nbytes < _CHUNK_PREFIX.size:
        raise ProtocolError("malformed", f"{view.nbytes} bytes is shorter than the chunk prefix")
    magic, head_len = _CHUNK_PREFIX.unpack_from(view)
    if magic != CHUNK_MAGIC:
        raise ProtocolError("malformed", f"bad magic {bytes(magic)!r}, expected {CHUNK_MAGIC!r}")
    if head_len > MAX_BINARY_HEADER:
        raise ProtocolError("too_large", f"header of {head_len} bytes exceeds {MAX_BINARY_HEADER}")
    end = _CHUNK_PREFIX.size + head_len
    if end > view.nbytes:
        raise ProtocolError("malformed", "the header runs past the payload")
    return view[_CHUNK_PREFIX.size:end], bytes(view[end:])


def _split_frame(view: memoryview) -> tuple[memoryview, tuple[np.ndarray, ...]]:
    """An ``api.framing`` frame held in memory: its header bytes and its tensors (read-only
    arrays over ``view``, no copy)."""
    if view.nbytes < _FRAME_PREFIX.size:
        raise ProtocolError("malformed", f"{view.nbytes} bytes is shorter than the frame prefix")
    magic, head_len, count = _FRAME_PREFIX.unpack_from(view)
    if magic != TENSOR_MAGIC:
        raise ProtocolError("malformed", f"bad magic {bytes(magic)!r}, expected {TENSOR_MAGIC!r}")
    if head_len > MAX_BINARY_HEADER:
        raise ProtocolError("too_large", f"header of {head_len} bytes exceeds {MAX_BINARY_HEADER}")
    if count > MAX_TENSORS:
        raise ProtocolError("malformed", f"{count} tensors, at most {MAX_TENSORS}")
    pos = _FRAME_PREFIX.size + head_len
    if pos > view.nbytes:
        raise ProtocolError("malformed", "the header runs past the payload")
    header = view[_FRAME_PREFIX.size:pos]
    framing = _framing()
    tensors = []
    for i in range(count):
        if pos + _U64.size > view.nbytes:
            raise ProtocolError("malformed", f"tensor {i}: length runs past the payload")
        (size,) = _U64.unpack_from(view, pos)
        pos += _U64.size
        if size > view.nbytes - pos:
            raise ProtocolError("malformed", f"tensor {i}: {size} bytes announced, {view.nbytes - pos} left")
        try:
            tensors.append(framing.decode_npy(view[pos:pos + size]))  # type: ignore[arg-type]
        except framing.FrameError as exc:
            raise ProtocolError("malformed", f"tensor {i}: {exc}") from exc
        pos += size
    if pos != view.nbytes:
        raise ProtocolError("malformed", f"{view.nbytes - pos} stray bytes after the last tensor")
    return header, tuple(tensors)


def _describe(exc: ValidationError) -> str:
    """The first few validation errors on one line (the full text can be huge)."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "(body)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


__all__ = [
    "API_ERRORS", "BINARY_KINDS", "COMMANDS", "COMMAND_ARGS", "DTYPES", "KINDS", "LIMITS", "LOCAL",
    "MAX_BINARY_HEADER", "MAX_CHUNK_BYTES", "MAX_HEALTH_BYTES", "REASONS", "SIGNED_BODY_LIMIT",
    "SIGNED_KINDS", "STEPS", "TRUST_REASONS",
    "ApiError", "ApiRequest", "ApiResponse", "CancelArgs", "Capabilities", "ChunkRequest", "ChunkResponse",
    "Command", "ControllerState", "DesiredState", "DeviceState", "DiagnosticsArgs", "ErrorInfo", "Event",
    "HealthSpec", "InferRequest", "InferResponse", "InlineTensor", "InstallProgress", "InstalledModel",
    "InstalledVersion", "Manifest", "Message", "ModelFigures", "ModelManifest", "ModelSignature", "ModelSpec",
    "OutboxFigures", "Part", "PingArgs", "ProtocolError", "Quantization", "Reply", "RestartArgs", "Root",
    "SetConfigArgs", "SignatureTensor", "SignedPart", "SystemFigures", "Telemetry",
    "decode", "encode", "kind_of",
]
