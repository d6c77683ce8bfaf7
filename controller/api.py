"""The console API, server side: one function per ``apispec`` method, over the store, the
rollout driver, the desired publisher and the command sender.

``ApiServer.handle(payload) -> (reply_topic, payload) | None`` is the whole protocol: it
decodes an ``ApiRequest``, validates ``params`` with ``apispec.PARAMS[method]``, runs the
method and answers with an ``ApiResponse`` — typed errors for everything that goes wrong
(bad_request, unknown_method, not_found, conflict, unavailable, timeout, internal). An
undecodable request has no trustworthy reply topic and is dropped (counted).

Methods run on worker threads (the daemon's pool), never on the MQTT dispatcher: ``cmd``
waits for a device's reply, which arrives through that dispatcher.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from controller import apispec, signing
from controller.commands import CommandSender
from controller.desired import DesiredPublisher
from controller.keys import KeyDir
from controller.rollouts import RolloutDriver
from controller.store import (Conflict, DeviceRecord, MigrationRecord, NotFound, ReleaseRecord, RolloutRecord, Store,
                              StoreError)
from edge_runtime import __version__
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.protocol import messages, topics
from edge_runtime.protocol.messages import ApiError, ApiRequest, ApiResponse, ProtocolError

__all__ = ["ApiServer", "device_row", "release_row", "rollout_row", "migration_row"]

log = logging.getLogger(__name__)


class BadRequest(EdgeRuntimeError):
    code = "bad_request"


def device_row(d: DeviceRecord, desired_generation: Optional[int] = None) -> dict[str, Any]:
    return {
        "id": d.id, "online": d.online, "tier": d.tier, "groups": list(d.groups),
        "models": {name: (m or {}).get("active") for name, m in sorted(d.reported.items())},
        "generation": d.reported_generation, "desired_generation": desired_generation,
        "last_seen": d.last_seen, "runtime_version": d.runtime_version,
    }


def _tensors(side: list[dict[str, Any]]) -> list[str]:
    return [f"{t['name']} {t['dtype']}{t['shape']}" for t in side]


def release_row(r: ReleaseRecord) -> dict[str, Any]:
    sig = r.manifest.get("signature", {})
    return {
        "model": r.model, "version": r.version, "sha256": r.sha256, "size": r.size,
        "created_at": r.created_at, "created_by": r.created_by,
        "inputs": _tensors(sig.get("inputs", [])), "outputs": _tensors(sig.get("outputs", [])),
        "health": r.manifest.get("health") is not None,
    }


def rollout_row(r: RolloutRecord, *, steps: bool = False) -> dict[str, Any]:
    counts = Counter(s.state for s in r.steps)
    row: dict[str, Any] = {
        "id": r.id, "model": r.model, "version": r.version, "target": r.target, "state": r.state,
        "wave": r.wave, "waves": max((s.wave for s in r.steps), default=-1) + 1, "plan": r.plan,
        "counts": dict(counts), "reason": r.reason, "figures": r.figures, "created_at": r.created_at,
        "updated_at": r.updated_at, "finished_at": r.finished_at, "created_by": r.created_by,
    }
    if steps:
        row["steps"] = [{
            "device_id": s.device_id, "wave": s.wave, "state": s.state, "previous_version": s.previous_version,
            "started_at": s.started_at, "finished_at": s.finished_at, "reason": s.reason, "detail": s.detail,
        } for s in r.steps]
    return row


def migration_row(m: MigrationRecord) -> dict[str, Any]:
    return {k: getattr(m, k) for k in (
        "id", "model", "version", "source", "from_node", "to_node", "state", "target_had", "timeouts",
        "step_started_at", "deadline", "reason", "prediction", "failure", "detail", "created_at", "updated_at",
        "finished_at", "created_by")}


class ApiServer:
    """See the module docstring."""

    def __init__(self, store: Store, *, driver: RolloutDriver, desired: DesiredPublisher, commands: CommandSender,
                 keydir: KeyDir, clock: Callable[[], float], instance: str, passphrase: Optional[str] = None,
                 validate_models: bool = True, migrations: Optional[Any] = None,
                 rebalancer: Optional[Any] = None) -> None:
        self.store = store
        self.driver = driver
        self.migrations = migrations  # migrations.MigrationDriver (None: migrate answers unavailable)
        self.rebalancer = rebalancer  # fleet_snapshot.Rebalancer
        self.desired = desired
        self.commands = commands
        self.keydir = keydir
        self.clock = clock
        self.instance = instance
        self.passphrase = passphrase
        self.validate_models = validate_models
        self.started = time.monotonic()
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.dropped = 0

    # -- the protocol -----------------------------------------------------------------------

    def handle(self, payload: bytes) -> Optional[tuple[str, bytes]]:
        try:
            request: ApiRequest = messages.decode("api_request", payload)
        except ProtocolError as exc:
            self.dropped += 1
            log.info("dropped an undecodable console request: %s", exc)
            return None
        response = self._answer(request)
        return request.reply_to, messages.encode(response)

    def _answer(self, request: ApiRequest) -> ApiResponse:
        method = request.method
        self.calls[method] += 1
        fn = getattr(self, "m_" + method.replace(".", "_"), None)
        model = apispec.PARAMS.get(method)
        try:
            if fn is None or model is None:
                raise _Failure("unknown_method", f"no method {method!r}; known: {', '.join(sorted(apispec.PARAMS))}")
            try:
                params = model.model_validate(request.params)
            except ValidationError as exc:
                raise _Failure("bad_request", f"params of {method}: {_describe(exc)}") from None
            actor = _actor(request.reply_to)
            result = fn(params, actor)
            return ApiResponse(request_id=request.request_id, ok=True, result=result)
        except _Failure as exc:
            return self._error(request, exc.type, str(exc))
        except NotFound as exc:
            return self._error(request, "not_found", str(exc))
        except Conflict as exc:
            return self._error(request, "conflict", str(exc))
        except (BadRequest, ValueError) as exc:
            return self._error(request, "bad_request", str(exc))
        except StoreError as exc:
            return self._error(request, "unavailable", str(exc))
        except EdgeRuntimeError as exc:
            return self._error(request, "bad_request" if exc.code == "invalid_model" else "internal", str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug: answer, log, keep serving
            log.exception("console method %s failed", method)
            return self._error(request, "internal", f"{type(exc).__name__}: {exc}")

    def _error(self, request: ApiRequest, kind: str, message: str) -> ApiResponse:
        self.errors[kind] += 1
        return ApiResponse(request_id=request.request_id, ok=False, error=ApiError(type=kind, message=message[:2000]))

    # -- methods ------------------------------------------------------------------------------

    def m_ping(self, p: apispec.NoParams, actor: str) -> dict[str, Any]:
        devices = self.store.list_devices()
        return {"instance": self.instance, "version": __version__, "uptime_s": round(time.monotonic() - self.started, 3),
                "devices": len(devices), "online": sum(d.online for d in devices)}

    def _desired_generations(self) -> dict[str, int]:
        return {r.device_id: r.generation for r in self.store.list_desired()}

    def m_devices_list(self, p: apispec.DevicesList, actor: str) -> list[dict[str, Any]]:
        gens = self._desired_generations()
        return [device_row(d, gens.get(d.id)) for d in self.store.list_devices(group=p.group)]

    def m_devices_show(self, p: apispec.DeviceId, actor: str) -> dict[str, Any]:
        d = self.store.get_device(p.id)
        desired = self.store.get_desired(p.id)
        return {
            "device": {**device_row(d, desired.generation if desired else None), "capabilities": d.capabilities,
                       "reported": d.reported, "boot_id": d.boot_id, "bd_seq": d.bd_seq,
                       "registered_at": d.registered_at},
            "assignments": [vars(a) for a in self.store.assignments(p.id)],
            "desired": None if desired is None else {"generation": desired.generation, "signed_at": desired.signed_at,
                                                     "expires_at": desired.expires_at},
            "events": self.store.recent_events(device_id=p.id, limit=20),
            "telemetry": d.last_telemetry,
            "steps": [vars(s) for s in self.store.steps_for_device(p.id, active_only=False)][-20:],
        }

    def m_devices_add(self, p: apispec.DevicesAdd, actor: str) -> dict[str, Any]:
        now = self.clock()
        d = self.store.register_device(p.id, groups=tuple(p.groups), now=now)
        self.store.audit(actor, "devices.add", f"device:{p.id}", {"groups": p.groups}, now=now)
        return device_row(d)

    def m_groups_list(self, p: apispec.NoParams, actor: str) -> dict[str, list[str]]:
        return self.store.list_groups()

    def m_groups_add(self, p: apispec.GroupEdit, actor: str) -> dict[str, list[str]]:
        now = self.clock()
        self.store.add_group(p.name, tuple(p.devices), now=now)
        self.store.audit(actor, "groups.add", f"group:{p.name}", {"devices": p.devices}, now=now)
        return {p.name: self.store.list_groups().get(p.name, [])}

    def m_groups_rm(self, p: apispec.GroupEdit, actor: str) -> dict[str, list[str]]:
        self.store.remove_group(p.name, tuple(p.devices))
        self.store.audit(actor, "groups.rm", f"group:{p.name}", {"devices": p.devices}, now=self.clock())
        groups = self.store.list_groups()
        return {p.name: groups[p.name]} if p.name in groups else {}

    def m_models_list(self, p: apispec.ModelsList, actor: str) -> list[dict[str, Any]]:
        return [release_row(r) for r in self.store.list_releases(p.model)]

    def m_models_upload_begin(self, p: apispec.UploadBegin, actor: str) -> dict[str, Any]:
        try:
            held = self.store.get_release(p.name, p.version)
        except NotFound:
            held = None
        if held is not None and held.sha256 != p.sha256:
            raise Conflict(f"{p.name}@{p.version} is already released with sha256 {held.sha256[:12]}...; "
                           f"push it under a new version")
        upload_id = "u" + hashlib.sha256(f"{p.name}@{p.version}:{p.sha256}".encode()).hexdigest()[:32]
        self.store.begin_upload(upload_id, model=p.name, version=p.version, size=p.size, sha256=p.sha256,
                                created_by=actor, now=self.clock())
        return {"upload_id": upload_id, "part_bytes": apispec.UPLOAD_PART_BYTES}

    def m_models_upload_part(self, p: apispec.UploadPart, actor: str) -> dict[str, Any]:
        try:
            data = base64.b64decode(p.data, validate=True)
        except ValueError as exc:
            raise BadRequest(f"data is not base64: {exc}") from None
        if len(data) > apispec.UPLOAD_PART_BYTES:
            raise BadRequest(f"a part holds at most {apispec.UPLOAD_PART_BYTES} bytes, got {len(data)}")
        return {"received": self.store.add_upload_part(p.upload_id, p.offset, data)}

    def m_models_upload_commit(self, p: apispec.UploadCommit, actor: str) -> dict[str, Any]:
        upload = self.store.get_upload(p.upload_id)
        sha256, size = self.store.finish_upload(p.upload_id)
        signature = messages.ModelSignature.model_validate(p.signature)
        if self.validate_models:
            signature = self._validated_signature(sha256, signature)
        manifest = messages.ModelManifest(
            name=upload["model"], version=upload["version"], sha256=sha256, size=size, signature=signature,
            health=None if p.health is None else messages.HealthSpec.model_validate(p.health),
        )
        now = self.clock()
        body = messages.Manifest(**manifest.model_dump(), issued_at=signing.utc_now(),
                                 expires=signing.utc_now() + signing.VALIDITY["manifest"])
        envelope = signing.sign_body(body, "manifest", self.keydir.signing_keys("deploy", passphrase=self.passphrase))
        release = ReleaseRecord(model=manifest.name, version=manifest.version, sha256=sha256, size=size,
                                manifest=manifest.model_dump(mode="json", exclude_none=True),
                                envelope=envelope.to_json().decode(), created_at=now, created_by=actor)
        self.store.add_release(release)
        self.store.audit(actor, "models.push", f"model:{manifest.name}@{manifest.version}",
                         {"sha256": sha256, "size": size}, now=now)
        return release_row(self.store.get_release(manifest.name, manifest.version))

    def _validated_signature(self, sha256: str, claimed: messages.ModelSignature) -> messages.ModelSignature:
        """Load the uploaded bytes with the engine; the signature it reads must be the claimed one."""
        try:
            from edge_runtime.engine import inspect_model
        except ImportError:  # no engine on this controller: trust the console's reading
            return claimed
        with tempfile.TemporaryDirectory(prefix="edgefleet-upload-") as tmp:
            path = Path(tmp) / "model.tflite"
            self.store.write_blob_to(sha256, str(path))
            read = messages.ModelSignature.model_validate(inspect_model(str(path)).to_dict())
        if read.model_dump(exclude_none=True) != claimed.model_dump(exclude_none=True):
            raise BadRequest("the signature the console sent does not match the uploaded file's; "
                             "re-run `fleetctl models push` with the same engine version")
        return read

    def m_deploy(self, p: apispec.Deploy, actor: str) -> dict[str, Any]:
        return rollout_row(self.driver.create(p, actor=actor))

    def m_rollouts_list(self, p: apispec.RolloutsList, actor: str) -> list[dict[str, Any]]:
        states = None if p.all else ("pending", "running", "paused")
        rows = [rollout_row(self.store.get_rollout(r.id)) for r in self.store.list_rollouts(states=states)]
        if not p.all and not rows:  # nothing active: show the latest few finished ones
            rows = [rollout_row(self.store.get_rollout(r.id)) for r in self.store.list_rollouts()[:5]]
        return rows

    def m_rollouts_show(self, p: apispec.RolloutId, actor: str) -> dict[str, Any]:
        return rollout_row(self.store.get_rollout(p.id), steps=True)

    def _rollout_action(self, p: apispec.RolloutId, actor: str, action: str) -> dict[str, Any]:
        return rollout_row(self.driver.request(p.id, action, actor=actor, reason=p.reason), steps=True)

    def m_rollouts_pause(self, p: apispec.RolloutId, actor: str) -> dict[str, Any]:
        return self._rollout_action(p, actor, "pause")

    def m_rollouts_resume(self, p: apispec.RolloutId, actor: str) -> dict[str, Any]:
        return self._rollout_action(p, actor, "resume")

    def m_rollouts_abort(self, p: apispec.RolloutId, actor: str) -> dict[str, Any]:
        return self._rollout_action(p, actor, "abort")

    def m_cmd(self, p: apispec.Cmd, actor: str) -> dict[str, Any]:
        self.store.get_device(p.device)
        record = self.commands.send(p.device, p.name, p.args, actor=actor, wait_s=p.wait_s)
        return {"device": record.device_id, "seq": record.seq, "name": record.name, "state": record.state,
                "reply": record.reply}

    def m_telemetry_recent(self, p: apispec.TelemetryRecent, actor: str) -> list[dict[str, Any]]:
        return self.store.recent_telemetry(device_id=p.device, limit=p.limit)

    def m_top(self, p: apispec.NoParams, actor: str) -> list[dict[str, Any]]:
        rows = []
        for d in self.store.list_devices():
            t = d.last_telemetry or {}
            system = t.get("system") or {}
            total, avail = system.get("memory_total_bytes"), system.get("memory_available_bytes")
            models = t.get("models") or {}
            rows.append({
                "id": d.id, "online": d.online, "tier": d.tier,
                "models": {name: (m or {}).get("active") for name, m in sorted(d.reported.items())},
                "p95_ms": {name: m.get("p95_ms") for name, m in sorted(models.items())},
                "cpu_percent": system.get("cpu_percent"),
                "memory_percent": round(100.0 * (1 - avail / total), 1) if total and avail is not None else None,
                "last_seen": d.last_seen,
            })
        return rows

    def m_audit_list(self, p: apispec.AuditList, actor: str) -> list[dict[str, Any]]:
        return self.store.list_audit(limit=p.limit)


    # -- migrations and placement ----------------------------------------------------------------

    def _migration_driver(self) -> Any:
        if self.migrations is None:
            raise _Failure("unavailable", "this controller runs no migration driver")
        return self.migrations

    def m_migrate(self, p: apispec.Migrate, actor: str) -> dict[str, Any]:
        timeouts = {k: v for k, v in p.timeouts.model_dump().items() if v is not None}
        return migration_row(self._migration_driver().create(p.model, p.source, p.to, actor=actor,
                                                             reason=p.reason or "operator", timeouts=timeouts))

    def m_migrations_list(self, p: apispec.MigrationsList, actor: str) -> list[dict[str, Any]]:
        from controller.migration import ACTIVE_STATES

        rows = self.store.list_migrations(states=None if p.all else ACTIVE_STATES, limit=None if p.all else 200)
        if not p.all and not rows:  # nothing active: the latest few finished ones
            rows = self.store.list_migrations(limit=5)
        return [migration_row(m) for m in rows]

    def m_migrations_show(self, p: apispec.MigrationId, actor: str) -> dict[str, Any]:
        return migration_row(self.store.get_migration(p.id))

    def m_migrations_abort(self, p: apispec.MigrationId, actor: str) -> dict[str, Any]:
        return migration_row(self._migration_driver().abort(p.id, actor=actor, reason=p.reason))

    def m_plan(self, p: apispec.PlanParams, actor: str) -> dict[str, Any]:
        if self.rebalancer is None:
            raise _Failure("unavailable", "this controller runs no placement planner")
        if p.slo_ms is None:
            return self.rebalancer.plan(apply=p.apply, actor=actor)
        import dataclasses

        return dataclasses.replace(self.rebalancer, slo_ms=p.slo_ms).plan(apply=p.apply, actor=actor)


class _Failure(Exception):
    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_


def _actor(reply_to: str) -> str:
    """Who asked: the console's client id (its reply topic names it; the broker's ACL lets a
    console read only its own)."""
    try:
        return f"console:{topics.parse(reply_to).client}"
    except (ValueError, AttributeError):
        return "console:?"


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(params)'}: {e['msg']}" for e in exc.errors()[:5])

