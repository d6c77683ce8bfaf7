"""Every exception the device runtime raises on purpose, typed by what the caller does next.

    EdgeRuntimeError
     ├── BackendUnavailable      neither interpreter package imports: install one (fatal)
     ├── ModelFileError          a file is not a loadable TFLite model (fatal for that file)
     ├── InputError              a predict call's tensors do not match the model (caller's fault)
     ├── ModelNotFound           no such model is served
     ├── ModelUnavailable        the model exists but cannot serve right now (retry later)
     │    ├── TooManyConnections the server refused the connection before reading a request
     │    ├── ShuttingDown       the server is stopping and admitted no new request
     │    ├── Busy               the executor node a call is routed to has a full queue
     │    ├── DeadlineExceeded   the executor node did not answer within the call's deadline
     │    └── ExecutorUnreachable the executor node cannot be reached (broker down, node gone)
     ├── StoreError
     │    ├── StoreCorrupt       the state file or a blob does not hold what it should
     │    ├── QuotaExceeded      the install would take the store past its disk quota
     │    ├── HashMismatch       an artifact's bytes do not match the expected sha256/size
     │    ├── VersionNotFound    the store does not hold that model version
     │    └── StoreBusy          another process holds the store lock
     └── InstallError            an install was refused or rolled back; `.reason` says why
          └── HealthCheckFailed  the new version failed its health check; `.figures` has the numbers

Outside this tree on purpose: ``protocol.trust.Rejection`` (a document refused, with one
of nine fixed reasons; it is an answer to report, not a runtime failure) and
``protocol.trust_store.TrustStoreError`` (NotProvisioned, AlreadyProvisioned,
TrustStoreCorrupt) for the persisted trust state. Agent pieces keep theirs beside them:
``agent.outbox.OutboxError`` (OutboxBusy), ``agent.transfer.TransferError``
(SourceUnavailable), ``agent.config.ConfigError``.

Each class carries a short machine-readable ``code`` that the REST API, the fast path and,
later, device events use, so a client never has to parse a message to decide what to do.
"""

from __future__ import annotations

from typing import Any


class EdgeRuntimeError(Exception):
    """Base of every deliberate runtime error."""

    code = "internal"
    http_status = 500

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.code, "message": str(self)}


class BackendUnavailable(EdgeRuntimeError):
    code = "backend_unavailable"
    http_status = 503


class ModelFileError(EdgeRuntimeError):
    """The bytes are not a model this runtime can load.

    ``reason`` is one of: ``not_found``, ``not_tflite``, ``truncated``, ``unresolved_op``,
    ``interpreter_crash`` (the isolated validator died on it), ``invalid``.
    """

    code = "invalid_model"
    http_status = 400

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "reason": self.reason}


class InputError(EdgeRuntimeError):
    """Tensors handed to predict do not match the model's signature."""

    code = "invalid_input"
    http_status = 400


class ModelNotFound(EdgeRuntimeError):
    code = "model_not_found"
    http_status = 404


class ModelUnavailable(EdgeRuntimeError):
    code = "model_unavailable"
    http_status = 503


class TooManyConnections(ModelUnavailable):
    """Refused at the door, before any request was read: always safe to retry."""

    code = "too_many_connections"


class ShuttingDown(ModelUnavailable):
    code = "shutting_down"


class Busy(ModelUnavailable):
    """The executor node a call is routed to refused it: its queue is full (backpressure).
    Raised to the caller only when no local copy could answer instead; retry later."""

    code = "busy"


class DeadlineExceeded(ModelUnavailable):
    """A routed call got no answer within its deadline and no local copy could answer."""

    code = "deadline_exceeded"


class ExecutorUnreachable(ModelUnavailable):
    """A routed call could not reach its executor node (broker down, node gone) and no
    local copy could answer."""

    code = "executor_unreachable"


class StoreError(EdgeRuntimeError):
    code = "store_error"


class StoreCorrupt(StoreError):
    code = "store_corrupt"


class QuotaExceeded(StoreError):
    code = "quota_exceeded"
    http_status = 507


class HashMismatch(StoreError):
    code = "hash_mismatch"
    http_status = 400


class VersionNotFound(StoreError):
    code = "version_not_found"
    http_status = 404


class StoreBusy(StoreError):
    code = "store_busy"
    http_status = 503


class InstallError(EdgeRuntimeError):
    """An install did not end with the new version active.

    ``reason`` is a stable token: ``invalid_model``, ``hash_mismatch``, ``quota_exceeded``,
    ``load_failed``, ``health_check_failed``, ``crash_loop``, ``invalid_request`` (bad name,
    version or digest), ``install_in_progress``, ``version_conflict`` (a version's bytes
    never change), ``no_download``.
    """

    code = "install_failed"
    http_status = 409

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "reason": self.reason}


class HealthCheckFailed(InstallError):
    code = "health_check_failed"

    def __init__(self, message: str, *, figures: dict[str, Any] | None = None) -> None:
        super().__init__(message, reason="health_check_failed")
        self.figures = figures or {}

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "figures": self.figures}


def _subclasses(cls: type[EdgeRuntimeError]) -> list[type[EdgeRuntimeError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


def error_from_dict(data: dict[str, Any]) -> EdgeRuntimeError:
    """Rebuild a typed error sent over the wire by ``to_dict`` (unknown codes → base class)."""
    code = str(data.get("type", "internal"))
    message = str(data.get("message", "unknown error"))
    by_code = {c.code: c for c in _subclasses(EdgeRuntimeError)}
    cls = by_code.get(code, EdgeRuntimeError)
    if cls is HealthCheckFailed:
        return HealthCheckFailed(message, figures=data.get("figures"))
    if issubclass(cls, (InstallError, ModelFileError)):
        return cls(message, reason=str(data.get("reason", "unknown")))  # type: ignore[call-arg]
    err = cls(message)
    return err
