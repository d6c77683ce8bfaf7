"""The console's MQTT request/response client and fleetctl end to end, against a real amqtt
broker and a scripted responder in the test (an MqttClient on ``topics.API_REQUEST`` that
answers with ``ApiResponse``s the test chooses) -- the controller daemon is not needed.

    1. matching     answers matched by request_id among foreign and unreadable ones, concurrently
    2. errors       ApiError -> ApiCallError (and fleetctl's exit 1 + {"error"}), bad params never sent,
                    no answer -> ControllerUnavailable (with the retained ctl/state offline), no broker
    3. upload       parts by offset, a dropped part sent again, progress; models push with a health spec
    4. live         telemetry tail --count 2 --json from telemetry the test publishes
    5. fleetctl     devices --json, deploy --json (params on the wire), deploy --wait until aborted

Every wait has a deadline (``wait_until``); nothing sleeps and hopes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pytest

from controller import apispec
from controller.apiclient import ApiCallError, ApiClient, BrokerUnavailable, ControllerUnavailable, InvalidParams
from controller.cli import main
from edge_runtime.mqtt import MqttClient, MqttConfig
from edge_runtime.protocol import messages, topics
from tests.helpers import free_port, wait_until

Script = Callable[[messages.ApiRequest], Optional[list[messages.ApiResponse]]]


@pytest.fixture(autouse=True)
def _wide_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendered tables are as wide as a pipe gets, whatever $COLUMNS the runner has."""
    monkeypatch.setenv("COLUMNS", "250")


def ok(req: messages.ApiRequest, result: Any) -> messages.ApiResponse:
    return messages.ApiResponse(request_id=req.request_id, ok=True, result=result)


def fail(req: messages.ApiRequest, type: str, message: str, reason: Optional[str] = None) -> messages.ApiResponse:  # noqa: A002
    return messages.ApiResponse(request_id=req.request_id, ok=False,
                                error=messages.ApiError(type=type, message=message, reason=reason))


class Responder:
    """Plays the controller: records every request, publishes what ``script`` returns
    (None: drop the request) to its reply_to."""

    def __init__(self, url: str, script: Script) -> None:
        self.script = script
        self.requests: list[messages.ApiRequest] = []
        self.client = MqttClient(MqttConfig(url=url, client_id=f"responder-{free_port()}"))
        self.client.add_handler(topics.API_REQUEST, self._on_request)
        self.client.connect(timeout=10)
        self.client.subscribe([(topics.API_REQUEST, 1)], timeout=10)

    def _on_request(self, msg: Any) -> None:
        req = messages.decode("api_request", msg.payload)
        self.requests.append(req)
        for resp in self.script(req) or []:
            payload = resp if isinstance(resp, bytes) else messages.encode(resp)
            self.client.publish(req.reply_to, payload, qos=1, timeout=10)

    def methods(self) -> list[str]:
        return [r.method for r in self.requests]

    def close(self) -> None:
        self.client.disconnect()


@pytest.fixture
def respond(amqtt_broker: Any) -> Iterator[Callable[[Script], Responder]]:
    made: list[Responder] = []

    def start(script: Script) -> Responder:
        r = Responder(amqtt_broker.url, script)
        made.append(r)
        return r

    yield start
    for r in made:
        r.close()


def publisher(url: str) -> MqttClient:
    c = MqttClient(MqttConfig(url=url, client_id=f"pub-{free_port()}"))
    c.connect(timeout=10)
    return c


# -- 1. matching ------------------------------------------------------------------------


def test_answers_are_matched_by_request_id_among_foreign_ones(amqtt_broker: Any, respond: Any) -> None:
    def script(req: messages.ApiRequest) -> list[Any]:
        device = req.params["id"]
        foreign = messages.ApiResponse(request_id="someone-else", ok=True, result={"device": {"id": "WRONG"}})
        # A foreign answer and junk before ours, another foreign one after.
        return [foreign, b"{not json", ok(req, {"device": {"id": device}}), foreign]

    responder = respond(script)
    results: dict[str, Any] = {}
    with ApiClient(amqtt_broker.url, timeout=10) as api:
        assert topics.valid_id(api.client_id) and api.client_id.startswith("fleetctl-")

        def one(i: int) -> None:
            results[f"dev-{i}"] = api.call("devices.show", id=f"dev-{i}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert {k: v["device"]["id"] for k, v in results.items()} == {f"dev-{i}": f"dev-{i}" for i in range(6)}
    assert len({r.request_id for r in responder.requests}) == 6
    req = responder.requests[0]
    assert req.reply_to == topics.api_reply(api.client_id) and req.deadline_ms == 10_000


def test_params_are_sent_as_the_spec_fills_them(amqtt_broker: Any, respond: Any) -> None:
    responder = respond(lambda req: [ok(req, [])])
    with ApiClient(amqtt_broker.url, timeout=10) as api:
        assert api.call("devices.list") == []
        assert api.call("audit.list", limit=5) == []
    assert [(r.method, r.params) for r in responder.requests] == [
        ("devices.list", {"group": None}), ("audit.list", {"limit": 5})]


# -- 2. errors --------------------------------------------------------------------------


def test_api_errors_are_typed(amqtt_broker: Any, respond: Any, capsys: pytest.CaptureFixture[str]) -> None:
    respond(lambda req: [fail(req, "conflict", "rollout 3 is already finished", "rollback")])
    with ApiClient(amqtt_broker.url, timeout=10) as api:
        with pytest.raises(ApiCallError) as exc:
            api.call("rollouts.pause", id=3)
    e = exc.value
    assert (e.type, e.message, e.reason, e.method) == ("conflict", "rollout 3 is already finished", "rollback",
                                                       "rollouts.pause")
    assert main(["rollout", "pause", "3", "--json", "--broker", amqtt_broker.url]) == 1
    cap = capsys.readouterr()
    assert json.loads(cap.out)["error"] == {"type": "conflict", "message": "rollout 3 is already finished",
                                            "reason": "rollback", "method": "rollouts.pause"}
    assert cap.err.startswith("fleetctl: rollouts.pause: rollout 3 is already finished")


def test_bad_params_are_never_sent(amqtt_broker: Any, respond: Any) -> None:
    responder = respond(lambda req: [ok(req, {"name": []})])
    with ApiClient(amqtt_broker.url, timeout=10) as api:
        with pytest.raises(InvalidParams):
            api.call("groups.add", name="lab", devices=["ok", "not/ok"])
        with pytest.raises(ValueError):
            api.call("deploy", model="m", version="1", to="everywhere")
        assert api.call("groups.list") == {"name": []}
    assert responder.methods() == ["groups.list"]


def test_no_answer_says_whether_the_controller_is_offline(amqtt_broker: Any) -> None:
    with ApiClient(amqtt_broker.url, timeout=0.5) as api:
        with pytest.raises(ControllerUnavailable, match="is `fleetctl serve` running and connected to mqtt://"):
            api.call("ping")
    at = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    pub = publisher(amqtt_broker.url)
    try:
        pub.publish(topics.CTL_STATE, messages.encode(messages.ControllerState(online=False, at=at, instance="ctl-a")),
                    qos=1, retain=True, timeout=10)
        with ApiClient(amqtt_broker.url, timeout=0.5) as api:
            wait_until(lambda: api.controller is not None, timeout=10, what="the retained ctl/state")
            with pytest.raises(ControllerUnavailable) as exc:
                api.call("ping")
    finally:
        pub.disconnect()
    assert "the controller (ctl-a) is offline since 2024-05-01T12:00:00+00:00" in str(exc.value)
    assert exc.value.controller is not None and exc.value.controller.online is False


def test_fleetctl_without_a_controller_or_broker(amqtt_broker: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--broker", amqtt_broker.url, "--timeout", "0.5"]) == 1
    assert "fleetctl serve" in capsys.readouterr().err
    url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(BrokerUnavailable, match=f"at {url}.*--broker, --username and --password-file"):
        ApiClient(url, timeout=2).connect()
    assert main(["devices", "--broker", url, "--timeout", "2", "--json"]) == 1
    cap = capsys.readouterr()
    assert json.loads(cap.out)["error"]["type"] == "broker_unavailable" and url in cap.err


# -- 3. uploads -------------------------------------------------------------------------


class UploadServer:
    """models.upload_* as a server would do them; ignores the first copy of one part."""

    def __init__(self, drop_offset: Optional[int] = None) -> None:
        self.drop_offset = drop_offset
        self.parts: list[int] = []  # offsets as received, duplicates included
        self.data = bytearray()
        self.begin: dict[str, Any] = {}
        self.commit: dict[str, Any] = {}

    def __call__(self, req: messages.ApiRequest) -> Optional[list[messages.ApiResponse]]:
        p = req.params
        if req.method == "models.upload_begin":
            self.begin = p
            return [ok(req, {"upload_id": "up-1", "part_bytes": apispec.UPLOAD_PART_BYTES})]
        if req.method == "models.upload_part":
            self.parts.append(p["offset"])
            if p["offset"] == self.drop_offset and self.parts.count(p["offset"]) == 1:
                return None  # lost: the client must send it again
            raw = base64.b64decode(p["data"])
            if p["offset"] == len(self.data):  # a duplicate of a stored part is a no-op
                self.data += raw
            return [ok(req, {"received": len(self.data)})]
        if req.method == "models.upload_commit":
            self.commit = p
            return [ok(req, {"model": self.begin["name"], "version": self.begin["version"], "size": len(self.data),
                             "sha256": hashlib.sha256(self.data).hexdigest(), "created_at": None, "created_by": None,
                             "inputs": [], "outputs": [], "health": p["health"] is not None})]
        return [fail(req, "unknown_method", req.method)]


def test_upload_sends_a_lost_part_again(amqtt_broker: Any, respond: Any, tmp_path: Path) -> None:
    blob = np.random.default_rng(1).bytes(2 * apispec.UPLOAD_PART_BYTES + 1234)
    path = tmp_path / "model.bin"
    path.write_bytes(blob)
    server = UploadServer(drop_offset=apispec.UPLOAD_PART_BYTES)
    respond(server)
    progress: list[tuple[int, int]] = []
    sig = {"inputs": [{"name": "x", "dtype": "float32", "shape": [1]}], "outputs": [{"name": "y", "dtype": "float32", "shape": [1]}]}
    with ApiClient(amqtt_broker.url, timeout=10) as api:
        release = api.upload(path, "m", "1", sig, None, progress=lambda d, t: progress.append((d, t)), part_timeout=0.5)
    part = apispec.UPLOAD_PART_BYTES
    assert server.parts == [0, part, part, 2 * part]
    assert bytes(server.data) == blob
    assert server.begin == {"name": "m", "version": "1", "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    assert release["sha256"] == hashlib.sha256(blob).hexdigest() and release["health"] is False
    assert progress == [(0, len(blob)), (part, len(blob)), (2 * part, len(blob)), (len(blob), len(blob))]


def test_models_push_uploads_with_a_health_spec(amqtt_broker: Any, respond: Any, zoo: dict[str, Any],
                                                model_files: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    model, path = zoo["tiny_v1"], model_files["tiny_v1"]
    sample = model.sample_inputs(seed=5)
    np.save(tmp_path / "x.npy", sample["x"])
    server = UploadServer()
    respond(server)
    assert main(["models", "push", str(path), "--name", "tiny", "--version", "1.0", "--health-sample",
                 str(tmp_path / "x.npy"), "--json", "--broker", amqtt_broker.url]) == 0
    release = json.loads(capsys.readouterr().out)
    assert release["model"] == "tiny" and release["health"] is True
    assert bytes(server.data) == path.read_bytes()
    assert messages.ModelSignature.model_validate(server.commit["signature"]).inputs[0].name == "x"
    health = messages.HealthSpec.model_validate(server.commit["health"])
    np.testing.assert_array_equal(health.inputs["x"].to_array(), sample["x"])
    np.testing.assert_allclose(health.expected["y"].to_array(), model.reference(sample)["y"], rtol=1e-5, atol=1e-6)


# -- 4. live telemetry ------------------------------------------------------------------


def test_telemetry_tail_count_json(amqtt_broker: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rc: list[int] = []
    tail = threading.Thread(target=lambda: rc.append(main(["telemetry", "tail", "--count", "2", "--json",
                                                           "--broker", amqtt_broker.url])))
    tail.start()
    pub = publisher(amqtt_broker.url)
    seq = 0
    try:
        def publish_one() -> bool:  # until the tail has subscribed and seen two samples
            nonlocal seq
            seq += 1
            t = messages.Telemetry(seq=seq, at=datetime.now(timezone.utc), interval_s=1, system=messages.SystemFigures(
                cpu_percent=10.0, memory_total_bytes=100, memory_available_bytes=40),
                models={"vision": messages.ModelFigures(version="2", calls=seq, p95_ms=3.0)})
            pub.publish(topics.telemetry("cam-7"), messages.encode(t), qos=1, timeout=10)
            return not tail.is_alive()

        wait_until(publish_one, timeout=30, interval=0.05, what="telemetry tail to stop after 2 samples")
    finally:
        pub.disconnect()
        tail.join(10)
    assert rc == [0]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    samples = [json.loads(line) for line in lines]
    assert [s["device_id"] for s in samples] == ["cam-7", "cam-7"]
    assert samples[1]["seq"] == samples[0]["seq"] + 1
    assert samples[0]["models"]["vision"]["calls"] == samples[0]["seq"]


# -- 5. fleetctl end to end -------------------------------------------------------------

DEVICE_ROWS = [
    {"id": "cam-1", "online": True, "tier": "edge", "groups": ["lab"], "models": {"vision": "2"}, "generation": 4,
     "desired_generation": 4, "last_seen": "2024-05-01T12:00:00+00:00", "runtime_version": "0.9.1"},
    {"id": "cam-2", "online": False, "tier": None, "groups": [], "models": {}, "generation": None,
     "desired_generation": None, "last_seen": None, "runtime_version": None},
]


def rollout_row(state: str, **kw: Any) -> dict[str, Any]:
    return {"id": 7, "model": "vision", "version": "2", "target": "group:lab", "state": state, "wave": 0, "waves": 2,
            "plan": {}, "counts": {"done": 1, "updating": 1}, "reason": None, "figures": {}, "created_at": None,
            "updated_at": None, "finished_at": None, "created_by": "fleetctl", **kw}


def test_devices_json_and_table(amqtt_broker: Any, respond: Any, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    responder = respond(lambda req: [ok(req, DEVICE_ROWS if req.params.get("group") is None else DEVICE_ROWS[:1])])
    monkeypatch.setenv("FLEETCTL_BROKER", amqtt_broker.url)  # the broker from the environment
    assert main(["devices", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == DEVICE_ROWS
    assert main(["devices", "--group", "lab"]) == 0
    out = capsys.readouterr().out
    assert "cam-1" in out and "vision@2" in out and "cam-2" not in out
    assert [r.params for r in responder.requests] == [{"group": None}, {"group": "lab"}]


def test_deploy_json_puts_the_plan_on_the_wire(amqtt_broker: Any, respond: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    responder = respond(lambda req: [ok(req, rollout_row("running"))])
    assert main(["deploy", "vision@2", "--to", "group:lab", "--canary", "10%", "--waves", "50,100", "--soak", "2m",
                 "--max-error-rate", "off", "--json", "--broker", amqtt_broker.url]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == 7
    (req,) = responder.requests
    assert req.method == "deploy"
    assert req.params == {"model": "vision", "version": "2", "to": "group:lab", "canary_pct": 10.0, "waves": [50.0, 100.0],
                          "soak_s": 120.0, "max_failures_pct": 5.0, "max_error_rate_pct": None,
                          "max_latency_regression_pct": 20.0, "step_timeout_s": 300.0}


def test_deploy_wait_follows_until_aborted(amqtt_broker: Any, respond: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shows: list[int] = []

    def script(req: messages.ApiRequest) -> list[messages.ApiResponse]:
        if req.method == "deploy":
            return [ok(req, rollout_row("pending"))]
        shows.append(req.params["id"])
        if len(shows) < 3:
            return [ok(req, {**rollout_row("running"), "steps": []})]
        return [ok(req, {**rollout_row("aborted", reason="failures 50% > 5%"), "steps": [
            {"device_id": "cam-1", "wave": 0, "state": "reverted", "previous_version": "1", "started_at": None,
             "finished_at": None, "reason": "health_check_failed", "detail": None}]})]

    respond(script)
    assert main(["deploy", "vision@2", "--to", "cam-1", "--wait", "--interval", "0.05", "--json",
                 "--broker", amqtt_broker.url]) == 1
    cap = capsys.readouterr()
    row = json.loads(cap.out)
    assert row["state"] == "aborted" and row["steps"][0]["state"] == "reverted"
    assert shows == [7, 7, 7]
    assert "rollout 7 aborted: failures 50% > 5%" in cap.err


def test_human_output_of_the_other_commands(amqtt_broker: Any, respond: Any, zoo: dict[str, Any],
                                            model_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    top_row = {"id": "cam-1", "online": True, "tier": "edge", "models": {"vision": "2"}, "p95_ms": {"vision": 4.5},
               "cpu_percent": 12.0, "memory_percent": 48.0, "last_seen": None}
    release = {"model": "vision", "version": "2", "sha256": "cd" * 32, "size": 2048, "created_at": None,
               "created_by": "ops", "inputs": ["x float32[1, 16]"], "outputs": ["y float32[1, 4]"], "health": False}
    answers: dict[str, Any] = {
        "top": [top_row], "audit.list": [{"at": None, "actor": "ops", "action": "deploy", "target": "all", "detail": None}],
        "models.list": [release], "groups.list": {"lab": ["cam-1"]}, "groups.rm": {},
        "rollouts.list": [rollout_row("running")], "rollouts.abort": rollout_row("aborted", reason="operator"),
        "devices.show": {"device": DEVICE_ROWS[0], "assignments": {"vision": "2"}, "desired": None, "events": [],
                         "telemetry": [], "steps": []},
        "devices.add": DEVICE_ROWS[1],
    }

    def script(req: messages.ApiRequest) -> list[messages.ApiResponse]:
        if req.method == "cmd":
            good = req.params["name"] == "ping"
            reply = {"ok": good, "result": {"pong": True}} if good else {"ok": False, "error": {"type": "busy", "message": "no"}}
            return [ok(req, {"device": req.params["device"], "seq": 3, "name": req.params["name"], "state": "answered",
                             "reply": reply})]
        if req.method.startswith("models.upload"):
            return UploadServer()(req) if req.method != "models.upload_commit" else [ok(req, release)]
        return [ok(req, answers[req.method])]

    responder = respond(script)
    b = ["--broker", amqtt_broker.url]
    for argv, rc, pieces in [
        (["top", "--once"], 0, ["cam-1", "vision@2", "4.5 ms", "12%", "48%"]),
        (["top", "--json"], 0, ['"p95_ms"']),
        (["audit", "--limit", "5"], 0, ["deploy", "ops"]),
        (["models", "ls"], 0, ["vision", "cdcdcdcdcdcd", "2.0 KiB"]),
        (["models", "push", str(model_files["tiny_v1"]), "--name", "vision", "--version", "2"], 0, ["cdcdcdcdcdcd"]),
        (["group", "ls"], 0, ["lab", "cam-1"]),
        (["group", "rm", "lab"], 0, ["group lab deleted"]),
        (["rollout", "ls", "--all"], 0, ["vision@2", "running"]),
        (["rollout", "abort", "7", "--reason", "bad"], 0, ["aborted", "operator"]),
        (["device", "show", "cam-1"], 0, ["device cam-1", "assignments"]),
        (["device", "add", "cam-2", "--group", "lab"], 0, ["cam-2"]),
        (["cmd", "ping", "cam-1", "--wait", "2s"], 0, ["ping (seq 3)", "pong"]),
        (["cmd", "set-config", "cam-1", "--log-level", "debug"], 1, ["set-config (seq 3)"]),
    ]:
        assert main(argv + b) == rc, argv
        out = capsys.readouterr().out
        for piece in pieces:
            assert piece in out, (argv, piece, out)
    by_method = {r.method: r.params for r in responder.requests}
    assert by_method["rollouts.abort"] == {"id": 7, "reason": "bad"}
    assert by_method["devices.add"] == {"id": "cam-2", "groups": ["lab"]}
    assert by_method["cmd"] == {"device": "cam-1", "name": "set-config", "args": {"log_level": "debug"}, "wait_s": 10.0}
    assert by_method["audit.list"] == {"limit": 5}
