"""The controller's tables (SQLAlchemy Core): the one place the database's shape is written.

Every time is a float of Unix seconds (UTC): portable between SQLite and PostgreSQL, cheap
to compare, and what ``time.time()`` gives. JSON columns hold plain dicts and lists (the
pydantic models' ``model_dump(mode="json")``). Names and ids follow ``topics.ID_PATTERN``.

    devices            one row per device ever seen or registered: last birth/death, reported state
    groups             named sets of devices (``group:NAME`` targets of deploys)
    device_groups      membership
    releases           one row per model version pushed: artifact sha256/size, the signed manifest
    blob_parts         artifact bytes in 256 KiB parts (every replica serves chunks from them)
    uploads            a model file arriving from the console in parts (any replica takes any part)
    upload_parts       those parts
    assignments        what a device should run, per model (version, route): the desired state's source
    desired            per device: the generation and the last signed document published
    rollouts           one row per deploy: its plan, state machine position and a CAS ``revision``;
                       at most one per model pending/running/paused (a partial unique index)
    rollout_devices    one row per (rollout, device): wave, previous version, step state
    migrations         one row per make-before-break move of (model, source) from one executor to
                       another: state machine position, step deadline, CAS ``revision``; at most one
                       active per (model, source) (a partial unique index). Added without a schema
                       version bump: ``create_all`` adds the table to an existing database and a
                       controller that predates it ignores it.
    telemetry          raw samples, unique on (device_id, seq): a redelivery is not stored twice
    telemetry_models   per sample and model: deltas of calls/errors and the interval's p95 (gates, top)
    rollups            per (model, version, hour): calls, errors, p95 weighted sums (kept after raw expires;
                       version "" when a sample names none)
    events             device events, unique on (device_id, seq)
    commands           commands the controller signed, unique on (device_id, seq), with their replies
    audit              who did what, when (every console write)
    meta               key/value: schema version, per-device counters that must only grow
"""

from __future__ import annotations

import sqlalchemy as sa

SCHEMA_VERSION = 1

# Rollout states in which a rollout still owns its model (``rollout.ACTIVE_STATES``): at most
# one rollout per model may be in one of them (a partial unique index, below).
ACTIVE_ROLLOUT_STATES = ("pending", "running", "paused")

# Migration states that still move (``migration.ACTIVE_STATES``): at most one migration per
# (model, source) may be in one of them.
ACTIVE_MIGRATION_STATES = ("pending", "deploying", "switching", "unloading", "reverting")

metadata = sa.MetaData()

_ID = sa.String(64)
_VERSION = sa.String(64)
_SHA = sa.String(64)

devices = sa.Table(
    "devices", metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("registered_at", sa.Float, nullable=False),
    sa.Column("online", sa.Boolean, nullable=False, default=False),
    sa.Column("boot_id", _ID),
    sa.Column("bd_seq", sa.BigInteger),
    sa.Column("state_at", sa.Float),  # when the last state message was taken in
    sa.Column("last_seen", sa.Float),  # any message from the device
    sa.Column("runtime_version", sa.String(64)),
    sa.Column("tier", sa.String(16)),
    sa.Column("capabilities", sa.JSON),
    sa.Column("reported", sa.JSON),  # DeviceState.models as reported
    sa.Column("reported_generation", sa.BigInteger),
    sa.Column("last_telemetry", sa.JSON),  # the newest Telemetry sample (for top / device show)
    sa.Column("last_telemetry_seq", sa.BigInteger),
    sa.Column("command_seq", sa.BigInteger, nullable=False, default=0),  # last command seq issued
)

groups = sa.Table(
    "groups", metadata,
    sa.Column("name", _ID, primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

device_groups = sa.Table(
    "device_groups", metadata,
    sa.Column("device_id", _ID, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("group_name", _ID, sa.ForeignKey("groups.name", ondelete="CASCADE"), primary_key=True),
)

releases = sa.Table(
    "releases", metadata,
    sa.Column("model", _ID, primary_key=True),
    sa.Column("version", _VERSION, primary_key=True),
    sa.Column("sha256", _SHA, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("manifest", sa.JSON, nullable=False),  # messages.ModelManifest, model_dump(mode="json")
    sa.Column("envelope", sa.Text, nullable=False),  # the signed Manifest (DSSE JSON): the release record
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False),
)

blob_parts = sa.Table(
    "blob_parts", metadata,
    sa.Column("sha256", _SHA, primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),  # part i holds bytes [i * PART, (i + 1) * PART)
    sa.Column("data", sa.LargeBinary, nullable=False),
)
BLOB_PART_BYTES = 256 * 1024

uploads = sa.Table(
    "uploads", metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("model", _ID, nullable=False),
    sa.Column("version", _VERSION, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", _SHA, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False),
)

upload_parts = sa.Table(
    "upload_parts", metadata,
    sa.Column("upload_id", _ID, sa.ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("offset", sa.BigInteger, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

assignments = sa.Table(
    "assignments", metadata,
    sa.Column("device_id", _ID, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("model", _ID, primary_key=True),
    sa.Column("version", _VERSION, nullable=False),
    sa.Column("route", _ID, nullable=False, default="local"),
    sa.Column("install", sa.Boolean, nullable=False, default=True),
    sa.Column("updated_at", sa.Float, nullable=False),
)

desired = sa.Table(
    "desired", metadata,
    sa.Column("device_id", _ID, sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("generation", sa.BigInteger, nullable=False),  # bumped by every assignment change
    sa.Column("changed_at", sa.Float, nullable=False),
    sa.Column("envelope", sa.Text),  # the last signed document for `signed_generation`
    sa.Column("signed_generation", sa.BigInteger),
    sa.Column("signed_at", sa.Float),
    sa.Column("expires_at", sa.Float),
)

rollouts = sa.Table(
    "rollouts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", _ID, nullable=False),
    sa.Column("version", _VERSION, nullable=False),
    sa.Column("target", sa.String(80), nullable=False),  # "device:ID" | "group:NAME" | "all"
    sa.Column("plan", sa.JSON, nullable=False),  # rollout.Plan as a dict
    sa.Column("state", sa.String(16), nullable=False),  # rollout.ROLLOUT_STATES
    sa.Column("wave", sa.Integer, nullable=False, default=0),  # index into the plan's waves
    sa.Column("wave_started_at", sa.Float),
    sa.Column("soak_until", sa.Float),
    sa.Column("reason", sa.Text),  # why it was aborted / failed
    sa.Column("figures", sa.JSON),  # the last gate figures computed
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False, default=0),  # compare-and-set between replicas
)
# One active rollout per model, also when two replicas create one at the same moment.
sa.Index(
    "ux_rollouts_active_model", rollouts.c.model, unique=True,
    sqlite_where=rollouts.c.state.in_(ACTIVE_ROLLOUT_STATES),
    postgresql_where=rollouts.c.state.in_(ACTIVE_ROLLOUT_STATES),
)

rollout_devices = sa.Table(
    "rollout_devices", metadata,
    sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("device_id", _ID, primary_key=True),
    sa.Column("wave", sa.Integer, nullable=False),
    sa.Column("previous_version", _VERSION),  # None: the device had no version of the model
    sa.Column("state", sa.String(16), nullable=False),  # rollout.STEP_STATES
    sa.Column("generation", sa.BigInteger),  # the desired generation that carries the new version
    sa.Column("started_at", sa.Float),
    sa.Column("deadline", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("reason", sa.String(64)),
    sa.Column("detail", sa.Text),
    sa.Index("ix_rollout_devices_device", "device_id"),
)

migrations = sa.Table(
    "migrations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", _ID, nullable=False),
    sa.Column("version", _VERSION, nullable=False),  # the version the source runs, deployed to the target
    sa.Column("source", _ID, nullable=False),  # the device whose calls move
    sa.Column("from_node", _ID, nullable=False),  # the executor before (the source itself when local)
    sa.Column("to_node", _ID, nullable=False),  # the executor after
    sa.Column("target_had", sa.Boolean, nullable=False, default=False),  # to_node held an assignment already
    sa.Column("state", sa.String(16), nullable=False),  # migration.STATES
    sa.Column("timeouts", sa.JSON, nullable=False),  # migration.Timeouts as a dict
    sa.Column("step_started_at", sa.Float),
    sa.Column("deadline", sa.Float),  # of the current step
    sa.Column("reason", sa.Text),  # why it was started (operator, or the planner's reason)
    sa.Column("prediction", sa.JSON),  # the planner's p95 before/after, when it came from a plan
    sa.Column("failure", sa.String(64)),  # why it reverted / failed (a typed code)
    sa.Column("detail", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False, default=0),  # compare-and-set between replicas
    sa.Index("ix_migrations_state", "state"),
)
# One active migration per workload (model, source), also when two replicas start one together.
sa.Index(
    "ux_migrations_active_workload", migrations.c.model, migrations.c.source, unique=True,
    sqlite_where=migrations.c.state.in_(ACTIVE_MIGRATION_STATES),
    postgresql_where=migrations.c.state.in_(ACTIVE_MIGRATION_STATES),
)

telemetry = sa.Table(
    "telemetry", metadata,
    sa.Column("device_id", _ID, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("at", sa.Float, nullable=False),  # the device's timestamp
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Index("ix_telemetry_received", "received_at"),
)

telemetry_models = sa.Table(
    "telemetry_models", metadata,
    sa.Column("device_id", _ID, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("model", _ID, primary_key=True),
    sa.Column("version", _VERSION),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("calls", sa.BigInteger, nullable=False),  # delta since the previous sample of the same boot
    sa.Column("errors", sa.BigInteger, nullable=False),
    sa.Column("p95_ms", sa.Float),
    sa.Index("ix_telemetry_models_mv", "model", "version", "at"),
    sa.Index("ix_telemetry_models_at", "at"),
)

rollups = sa.Table(
    "rollups", metadata,
    sa.Column("model", _ID, primary_key=True),
    sa.Column("version", _VERSION, primary_key=True),
    sa.Column("hour", sa.BigInteger, primary_key=True),  # Unix hour: int(at // 3600)
    sa.Column("calls", sa.BigInteger, nullable=False, default=0),
    sa.Column("errors", sa.BigInteger, nullable=False, default=0),
    sa.Column("p95_weighted", sa.Float, nullable=False, default=0.0),  # sum(p95 * calls)
    sa.Column("samples", sa.BigInteger, nullable=False, default=0),
)

events = sa.Table(
    "events", metadata,
    sa.Column("device_id", _ID, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("step", sa.String(32), nullable=False),
    sa.Column("model", _ID),
    sa.Column("version", _VERSION),
    sa.Column("generation", sa.BigInteger),
    sa.Column("reason", sa.String(64)),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Index("ix_events_model", "model", "version"),
    sa.Index("ix_events_received", "received_at"),
)

commands = sa.Table(
    "commands", metadata,
    sa.Column("device_id", _ID, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("name", sa.String(32), nullable=False),
    sa.Column("args", sa.JSON, nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("issued_by", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # "sent" | "ok" | "failed"
    sa.Column("reply", sa.JSON),
    sa.Column("replied_at", sa.Float),
)

audit = sa.Table(
    "audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(128)),
    sa.Column("detail", sa.JSON),
)

meta = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.JSON, nullable=False),
)
