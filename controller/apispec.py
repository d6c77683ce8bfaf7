"""The console API: every method ``fleetctl`` may call on the controller over MQTT, with its
parameters as a pydantic model. The server (``api.py``) validates ``ApiRequest.params``
with ``PARAMS[method]``; the client (``apiclient.py``) builds them with the same models, so
the two cannot drift. Results are plain JSON (described per method below).

Transport: ``messages.ApiRequest`` on ``fleet/v1/ctl/api/req`` (QoS 1) with ``reply_to`` =
``topics.api_reply(client_id)``; the answer is a ``messages.ApiResponse`` there. Errors
are ``ApiError`` types: bad_request (params), unknown_method, not_found, conflict,
unavailable, timeout, internal, malformed, too_large.

    method              params                   result
    ping                -                        {instance, version, uptime_s, devices, online}
    devices.list        group?                   [DeviceRow]
    devices.show        id                       {device, assignments, desired, events, telemetry, steps}
    devices.add         id, groups               DeviceRow
    groups.list         -                        {name: [device ids]}
    groups.add          name, devices            {name: [device ids]}
    groups.rm           name, devices            {name: [device ids]} ({} when deleted)
    models.list         model?                   [ReleaseRow]
    models.upload_begin name, version, size, sha256          {upload_id, part_bytes}
    models.upload_part  upload_id, offset, data (base64)      {received}
    models.upload_commit upload_id, signature, health?        ReleaseRow
    deploy              model, version, to, plan fields       RolloutRow
    rollouts.list       all                      [RolloutRow]
    rollouts.show       id                       RolloutRow with "steps": [StepRow]
    rollouts.pause|resume|abort  id, reason?     RolloutRow
    cmd                 device, name, args, wait_s            {device, seq, name, state, reply}
    telemetry.recent    device?, limit           [Telemetry json + device_id, received_at]
    top                 -                        [TopRow]
    audit.list          limit                    [{at, actor, action, target, detail}]
    migrate             model, source, to, timeouts?          MigrationRow
    migrations.list     all                      [MigrationRow]
    migrations.show     id                       MigrationRow
    migrations.abort    id, reason?              MigrationRow
    plan                apply, slo_ms?           PlanResult

Row shapes (all keys always present; absent values are null):

    DeviceRow   {id, online, tier, groups, models: {name: active version}, generation,
                 desired_generation, last_seen, runtime_version}
    ReleaseRow  {model, version, sha256, size, created_at, created_by, inputs, outputs, health}
                (inputs/outputs: ["name dtype[shape]"], health: bool)
    RolloutRow  {id, model, version, target, state, wave, waves, plan, counts: {step state: n},
                 reason, figures, created_at, updated_at, finished_at, created_by}
    StepRow     {device_id, wave, state, previous_version, started_at, finished_at, reason, detail}
    TopRow      {id, online, tier, models: {name: version}, p95_ms: {name: ms}, cpu_percent,
                 memory_percent, last_seen}
    MigrationRow {id, model, version, source, from_node, to_node, state, target_had, timeouts,
                 step_started_at, deadline, reason, prediction, failure, detail, created_at,
                 updated_at, finished_at, created_by}
    PlanResult  {moves: [{model, source, from_node, to_node, reason, p95_before_ms,
                 p95_after_ms, migration (id started or null), skipped (why not, or null)}],
                 violations_before, violations_after, peak_utilisation_before,
                 peak_utilisation_after, method, workloads, nodes}
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from edge_runtime.protocol.messages import ID_PATTERN, VERSION_PATTERN

Id = Annotated[str, Field(pattern=ID_PATTERN)]
Version = Annotated[str, Field(pattern=VERSION_PATTERN)]
Pct = Annotated[float, Field(ge=0, le=100)]
UPLOAD_PART_BYTES = 40 * 1024  # raw bytes per models.upload_part: base64 + JSON stays under api_request's 64 KiB


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoParams(Params):
    pass


class DevicesList(Params):
    group: Optional[Id] = None


class DeviceId(Params):
    id: Id


class DevicesAdd(Params):
    id: Id
    groups: list[Id] = Field(default_factory=list, max_length=32)


class GroupEdit(Params):
    name: Id
    devices: list[Id] = Field(default_factory=list, max_length=10_000)


class ModelsList(Params):
    model: Optional[Id] = None


class UploadBegin(Params):
    name: Id
    version: Version
    size: int = Field(ge=1, le=4 * 1024 ** 3)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class UploadPart(Params):
    upload_id: Id
    offset: int = Field(ge=0)
    data: str = Field(max_length=60_000)  # base64 of at most UPLOAD_PART_BYTES


class UploadCommit(Params):
    upload_id: Id
    signature: dict[str, Any]  # messages.ModelSignature json, as the console's engine read it
    health: Optional[dict[str, Any]] = None  # messages.HealthSpec json


class Deploy(Params):
    model: Id
    version: Version
    to: str = Field(pattern=r"^(all|device:[A-Za-z0-9][A-Za-z0-9._-]{0,63}|group:[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")
    canary_pct: Optional[Pct] = None
    waves: list[Pct] = Field(default_factory=lambda: [100.0], min_length=1, max_length=20)
    soak_s: float = Field(default=60.0, ge=0, le=7 * 86400)
    max_failures_pct: Pct = 5.0
    max_error_rate_pct: Optional[Pct] = 1.0
    max_latency_regression_pct: Optional[float] = Field(default=20.0, ge=0, le=10_000)
    step_timeout_s: float = Field(default=300.0, gt=0, le=7 * 86400)


class RolloutsList(Params):
    all: bool = False


class RolloutId(Params):
    id: int = Field(ge=1)
    reason: Optional[str] = Field(default=None, max_length=500)


class Cmd(Params):
    device: Id
    name: str = Field(pattern=r"^(ping|diagnostics|restart|set-config|cancel)$")
    args: dict[str, Any] = Field(default_factory=dict)
    wait_s: float = Field(default=10.0, ge=0, le=300)


class TelemetryRecent(Params):
    device: Optional[Id] = None
    limit: int = Field(default=20, ge=1, le=1000)


class AuditList(Params):
    limit: int = Field(default=50, ge=1, le=1000)


class MigrationTimeouts(Params):
    deploy_s: Optional[float] = Field(default=None, gt=0, le=7 * 86400)
    switch_s: Optional[float] = Field(default=None, gt=0, le=7 * 86400)
    unload_s: Optional[float] = Field(default=None, gt=0, le=7 * 86400)
    revert_s: Optional[float] = Field(default=None, gt=0, le=7 * 86400)


class Migrate(Params):
    model: Id
    source: Id
    to: Id
    timeouts: MigrationTimeouts = Field(default_factory=MigrationTimeouts)
    reason: Optional[str] = Field(default=None, max_length=500)


class MigrationsList(Params):
    all: bool = False


class MigrationId(Params):
    id: int = Field(ge=1)
    reason: Optional[str] = Field(default=None, max_length=500)


class PlanParams(Params):
    apply: bool = False
    slo_ms: Optional[float] = Field(default=None, gt=0, le=3_600_000)


PARAMS: dict[str, type[Params]] = {
    "ping": NoParams,
    "devices.list": DevicesList,
    "devices.show": DeviceId,
    "devices.add": DevicesAdd,
    "groups.list": NoParams,
    "groups.add": GroupEdit,
    "groups.rm": GroupEdit,
    "models.list": ModelsList,
    "models.upload_begin": UploadBegin,
    "models.upload_part": UploadPart,
    "models.upload_commit": UploadCommit,
    "deploy": Deploy,
    "rollouts.list": RolloutsList,
    "rollouts.show": RolloutId,
    "rollouts.pause": RolloutId,
    "rollouts.resume": RolloutId,
    "rollouts.abort": RolloutId,
    "cmd": Cmd,
    "telemetry.recent": TelemetryRecent,
    "top": NoParams,
    "audit.list": AuditList,
    "migrate": Migrate,
    "migrations.list": MigrationsList,
    "migrations.show": MigrationId,
    "migrations.abort": MigrationId,
    "plan": PlanParams,
}
