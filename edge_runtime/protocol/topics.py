"""Every MQTT topic of the fleet protocol: building them, filtering them, parsing them back.

This is the one module that assembles a topic string (STYLE.md #6); the agent, the
controller, the console and the broker ACLs all ask it. Nothing here does I/O.

    topic                                   publisher       QoS  retained  payload
    fleet/v1/dev/{id}/state                 device (+Will)  1    yes       state
    fleet/v1/dev/{id}/desired               controller      1    yes       DSSE(desired)
    fleet/v1/dev/{id}/cmd                   controller      1    no        DSSE(command)
    fleet/v1/dev/{id}/reply                 device          1    no        reply
    fleet/v1/dev/{id}/events                device          1    no        event
    fleet/v1/dev/{id}/telemetry             device          1    no        telemetry
    fleet/v1/dev/{id}/inbox/chunk/{sha}     controller      1    no        chunk (binary)
    fleet/v1/dev/{id}/inbox/infer           executor node   1    no        infer_response (binary)
    fleet/v1/artifacts/{sha}/req            device          1    no        chunk_request
    fleet/v1/node/{id}/infer/{model}        device          1    no        infer_request (binary)
    fleet/v1/ctl/state                      controller(+W)  1    yes       ctl_state
    fleet/v1/trust/root/{version}           controller      1    yes       DSSE(root)
    fleet/v1/ctl/api/req                    console         1    no        api_request
    fleet/v1/ctl/api/reply/{client}         controller      1    no        api_response

``TOPICS`` holds the same table as data (``docs/protocol.md`` is generated from it).
Every id that goes into a topic (device, node, model, client, shared-subscription group)
is one segment of ``ID_PATTERN``: 1 to 64 characters of
``[A-Za-z0-9._-]``, starting with a letter or digit. That is the rule of a signed
``Target`` too, so every device a document can name has a topic, and no id can smuggle in
a ``/``, a wildcard (``+``, ``#``), a ``$`` or an empty level. An artifact is named by
its sha256 (64 lowercase hex digits); a root of trust by its version (a decimal integer
>= 1, no leading zero).

The roots are fleet-wide, not per device: every device reads ``fleet/v1/trust/root/+``
(retained, one topic per version, so a device N versions behind finds each one it must
walk through) and none may publish there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from edge_runtime.protocol.signed import _ID as ID_PATTERN  # one id rule for targets and topics

PREFIX = "fleet/v1"
MAX_ID_LENGTH = 64
_ID_RE = re.compile(ID_PATTERN)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

TopicKind = Literal[
    "state", "desired", "cmd", "reply", "events", "telemetry", "chunk_inbox", "infer_inbox",
    "artifact_req", "infer", "ctl_state", "api_req", "api_reply", "trust_root",
]
# The per-device topics directly under fleet/v1/dev/{id}/ (the inbox has sub-levels).
DEVICE_KINDS: tuple[str, ...] = ("state", "desired", "cmd", "reply", "events", "telemetry")

CTL_STATE = f"{PREFIX}/ctl/state"
API_REQUEST = f"{PREFIX}/ctl/api/req"
ARTIFACT_REQUESTS = f"{PREFIX}/artifacts/+/req"
TRUST_ROOTS = f"{PREFIX}/trust/root/+"  # every root version the controller announces
MAX_ROOT_VERSION = 2**31 - 1
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,9}$")


@dataclass(frozen=True)
class TopicSpec:
    """One row of the topic table."""

    kind: TopicKind
    pattern: str
    publisher: str
    subscribers: str
    qos: int
    retained: bool
    payload: str  # a ``messages`` kind
    signed: bool  # the payload is a DSSE envelope around that kind
    binary: bool  # JSON header + raw bytes rather than JSON
    purpose: str


TOPICS: dict[str, TopicSpec] = {
    t.kind: t
    for t in (
        TopicSpec("state", f"{PREFIX}/dev/{{id}}/state", "device; broker publishes its Last Will", "controller",
                  1, True, "state", False, False,
                  "birth (online, capabilities, installed models) and death (offline); the reported state"),
        TopicSpec("desired", f"{PREFIX}/dev/{{id}}/desired", "controller", "the device",
                  1, True, "desired", True, False,
                  "what the device should run and where each model executes; monotonic generation"),
        TopicSpec("cmd", f"{PREFIX}/dev/{{id}}/cmd", "controller", "the device",
                  1, False, "command", True, False,
                  "one-shot commands, executed at most once (seq floor); never retained"),
        TopicSpec("reply", f"{PREFIX}/dev/{{id}}/reply", "device", "controller",
                  1, False, "reply", False, False, "the result of one command"),
        TopicSpec("events", f"{PREFIX}/dev/{{id}}/events", "device (through its outbox)", "controller",
                  1, False, "event", False, False, "install progress, rejections, rollbacks, fallbacks"),
        TopicSpec("telemetry", f"{PREFIX}/dev/{{id}}/telemetry", "device (through its outbox)",
                  "controller, fleetctl top/tail", 1, False, "telemetry", False, False,
                  "system and per-model figures with a persisted seq"),
        TopicSpec("chunk_inbox", f"{PREFIX}/dev/{{id}}/inbox/chunk/{{sha256}}", "controller (chunk server)",
                  "the device", 1, False, "chunk", False, True, "the chunks of one artifact, one topic per transfer"),
        TopicSpec("infer_inbox", f"{PREFIX}/dev/{{id}}/inbox/infer", "executor node", "the device (the caller)",
                  1, False, "infer_response", False, True, "remote inference results"),
        TopicSpec("artifact_req", f"{PREFIX}/artifacts/{{sha256}}/req", "device", "controller (chunk server)",
                  1, False, "chunk_request", False, False, "ask for a byte range of an artifact"),
        TopicSpec("infer", f"{PREFIX}/node/{{id}}/infer/{{model}}", "device (the caller)", "the executor node",
                  1, False, "infer_request", False, True, "a remote inference call"),
        TopicSpec("ctl_state", CTL_STATE, "controller; broker publishes its Last Will", "devices, fleetctl",
                  1, True, "ctl_state", False, False, "controller online/offline (Sparkplug primary host STATE)"),
        TopicSpec("api_req", API_REQUEST, "fleetctl", "controller (shared among replicas)",
                  1, False, "api_request", False, False, "console request"),
        TopicSpec("api_reply", f"{PREFIX}/ctl/api/reply/{{client}}", "controller", "that fleetctl",
                  1, False, "api_response", False, False, "console response"),
        TopicSpec("trust_root", f"{PREFIX}/trust/root/{{version}}", "controller", "every device",
                  1, True, "root", True, False,
                  "root of trust version N (N >= 2), the bytes of root.N.json; devices walk N+1, N+2, ..."),
    )
}


@dataclass(frozen=True)
class TopicInfo:
    """What a received topic names. Only the fields of its kind are set."""

    kind: TopicKind
    device: Optional[str] = None  # dev/{id}/... topics, inboxes included
    sha256: Optional[str] = None  # artifact_req, chunk_inbox
    node: Optional[str] = None  # infer
    model: Optional[str] = None  # infer
    client: Optional[str] = None  # api_reply
    version: Optional[int] = None  # trust_root


@dataclass(frozen=True)
class Acl:
    """What one client may publish and subscribe to (MQTT filters)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def valid_id(value: object) -> bool:
    """True when ``value`` may be one topic level: a plain id of 1..64 safe characters."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None  # match() lets "id\n" through


def check_id(value: object, what: str = "id") -> str:
    """``value`` itself, if it may be one topic level.

    Raises:
        ValueError: not a string, empty, longer than 64, or holding anything but
            ``[A-Za-z0-9._-]`` (so no ``/``, ``+``, ``#``, ``$``, spaces or NUL).
    """
    if not valid_id(value):
        raise ValueError(
            f"invalid {what} {value!r}: expected 1-{MAX_ID_LENGTH} characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return value  # type: ignore[return-value]


def check_sha256(value: object) -> str:
    """``value`` itself, if it is a lowercase hex sha256.

    Raises:
        ValueError: anything else.
    """
    if not isinstance(value, str) or _SHA_RE.fullmatch(value) is None:
        raise ValueError(f"invalid sha256 {value!r}: expected 64 lowercase hex digits")
    return value


# -- building ----------------------------------------------------------------------------


def device_topic(device_id: str, kind: str) -> str:
    """``fleet/v1/dev/{device_id}/{kind}`` for one of ``DEVICE_KINDS``.

    Raises:
        ValueError: a bad device id or an unknown kind.
    """
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}; expected one of {', '.join(DEVICE_KINDS)}")
    return f"{PREFIX}/dev/{check_id(device_id, 'device id')}/{kind}"


def state(device_id: str) -> str:
    """Raises: ValueError: a bad device id."""
    return device_topic(device_id, "state")


def desired(device_id: str) -> str:
    """Raises: ValueError: a bad device id."""
    return device_topic(device_id, "desired")


def cmd(device_id: str) -> str:
    """Raises: ValueError: a bad device id."""
    return device_topic(device_id, "cmd")


def reply(device_id: str) -> str:
    """Raises: ValueError: a bad device id."""
    return device_topic(device_id, "reply")


def events(device_id: str) -> str:
    """Raises: ValueError: a bad device id."""
    return device_topic(device_id, "events")


def telemetry(device_id: str) -> str:
    """Raises: ValueError: a bad device id."""
    return device_topic(device_id, "telemetry")


def chunk_inbox(device_id: str, sha256: str) -> str:
    """``fleet/v1/dev/{device_id}/inbox/chunk/{sha256}``: where the chunks of one artifact
    requested by ``device_id`` arrive (one topic per transfer).

    Raises:
        ValueError: a bad device id or sha256.
    """
    return f"{PREFIX}/dev/{check_id(device_id, 'device id')}/inbox/chunk/{check_sha256(sha256)}"


def infer_inbox(device_id: str) -> str:
    """``fleet/v1/dev/{device_id}/inbox/infer``: where remote-inference replies for
    ``device_id`` arrive (the correlation id is in the payload).

    Raises:
        ValueError: a bad device id.
    """
    return f"{PREFIX}/dev/{check_id(device_id, 'device id')}/inbox/infer"


def artifact_request(sha256: str) -> str:
    """``fleet/v1/artifacts/{sha256}/req``.

    Raises:
        ValueError: not a lowercase hex sha256.
    """
    return f"{PREFIX}/artifacts/{check_sha256(sha256)}/req"


def infer(node_id: str, model: str) -> str:
    """``fleet/v1/node/{node_id}/infer/{model}``: a call to ``model`` on executor ``node_id``.

    Raises:
        ValueError: a bad node id or model name.
    """
    return f"{PREFIX}/node/{check_id(node_id, 'node id')}/infer/{check_id(model, 'model name')}"


def check_root_version(value: object) -> int:
    """``value`` itself, if it may name a root version in a topic (an int, 1..2**31-1).

    Raises:
        ValueError: anything else (``bool`` included).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ROOT_VERSION:
        raise ValueError(f"invalid root version {value!r}: expected an integer from 1 to {MAX_ROOT_VERSION}")
    return value


def trust_root(version: int) -> str:
    """``fleet/v1/trust/root/{version}``: root of trust ``version``, retained.

    Raises:
        ValueError: not an integer from 1 to 2**31-1.
    """
    return f"{PREFIX}/trust/root/{check_root_version(version)}"


def api_reply(client_id: str) -> str:
    """``fleet/v1/ctl/api/reply/{client_id}``: where one console reads its responses.

    Raises:
        ValueError: a bad client id.
    """
    return f"{PREFIX}/ctl/api/reply/{check_id(client_id, 'client id')}"


# -- subscription filters ----------------------------------------------------------------


def all_devices(kind: str) -> str:
    """``fleet/v1/dev/+/{kind}``: one kind of topic from every device (the controller's view).

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}; expected one of {', '.join(DEVICE_KINDS)}")
    return f"{PREFIX}/dev/+/{kind}"


def inbox_filter(device_id: str) -> str:
    """``fleet/v1/dev/{device_id}/inbox/#``: everything addressed to one device.

    Raises:
        ValueError: a bad device id.
    """
    return f"{PREFIX}/dev/{check_id(device_id, 'device id')}/inbox/#"


def infer_filter(node_id: str) -> str:
    """``fleet/v1/node/{node_id}/infer/+``: every call to models on one executor.

    Raises:
        ValueError: a bad node id.
    """
    return f"{PREFIX}/node/{check_id(node_id, 'node id')}/infer/+"


def shared(group: str, topic_filter: str) -> str:
    """``$share/{group}/{topic_filter}``: replicas in ``group`` split the messages.

    An MQTT 5 feature that Mosquitto and EMQX also honour for 3.1.1 clients; where the
    broker lacks it, subscribe to the plain filter with one replica.

    Raises:
        ValueError: a bad group, or a filter that is not valid or already shared.
    """
    check_id(group, "share group")
    check_filter(topic_filter)
    if topic_filter.startswith("$"):
        raise ValueError(f"cannot share {topic_filter!r}: it is already a $-topic")
    return f"$share/{group}/{topic_filter}"


def check_filter(topic_filter: str) -> str:
    """``topic_filter`` itself, if it is a valid MQTT filter.

    Raises:
        ValueError: empty, NUL, ``#`` not alone at the end, ``+`` not a whole level.
    """
    if not isinstance(topic_filter, str) or not topic_filter or "\0" in topic_filter:
        raise ValueError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"invalid topic filter {topic_filter!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"invalid topic filter {topic_filter!r}: '+' must be a whole level")
    return topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """Whether a published ``topic`` matches a subscription filter, by the MQTT rules.

    A ``$share/{group}/`` prefix is ignored; wildcards at the first level never match a
    ``$`` topic.

    Raises:
        ValueError: an invalid filter.
    """
    check_filter(topic_filter)
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3:
            raise ValueError(f"invalid shared filter {topic_filter!r}")
        topic_filter = parts[2]
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    want, got = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(got) or (level != "+" and level != got[i]):
            return False
    return len(want) == len(got)


# -- who may do what ---------------------------------------------------------------------


def device_subscriptions(device_id: str) -> list[tuple[str, int]]:
    """(filter, QoS) pairs a device runtime subscribes to: the roots of trust, its desired
    state, its commands, its inbox, the controller's STATE, and the calls to it as an
    executor node. The roots come first: a broker sends the retained messages of one
    SUBSCRIBE filter by filter, so a device back from a long absence sees the roots before
    a desired state signed by keys only the newest root names.

    Raises:
        ValueError: a bad device id.
    """
    return [
        (TRUST_ROOTS, TOPICS["trust_root"].qos),
        (desired(device_id), TOPICS["desired"].qos),
        (cmd(device_id), TOPICS["cmd"].qos),
        (inbox_filter(device_id), TOPICS["chunk_inbox"].qos),
        (CTL_STATE, TOPICS["ctl_state"].qos),
        (infer_filter(device_id), TOPICS["infer"].qos),
    ]


def controller_subscriptions(share_group: Optional[str] = None) -> list[tuple[str, int]]:
    """(filter, QoS) pairs the controller subscribes to; shared among replicas when a
    ``share_group`` is given. ``state`` is never shared: every replica keeps the full
    online/offline picture.

    Raises:
        ValueError: a bad group.
    """
    def maybe_shared(f: str) -> str:
        return shared(share_group, f) if share_group is not None else f

    subs = [(all_devices("state"), TOPICS["state"].qos)]
    subs += [(maybe_shared(all_devices(k)), TOPICS[k].qos) for k in ("reply", "events", "telemetry")]
    subs.append((maybe_shared(ARTIFACT_REQUESTS), TOPICS["artifact_req"].qos))
    subs.append((maybe_shared(API_REQUEST), TOPICS["api_req"].qos))
    return subs


def device_acl(device_id: str) -> Acl:
    """What the broker lets device ``device_id`` do.

    It publishes its own reports (never its own ``desired`` or ``cmd``: a retained document
    it overwrote would be refused as unsigned, but the good one would be gone), requests
    for artifacts, calls to executors, and inference replies to callers' inboxes (it may
    be an executor). It reads only what is its own plus the controller's STATE and the
    fleet's roots of trust (read-only: a retained root it could overwrite would be refused
    as unsigned, but the good one would be gone for every other device).

    Raises:
        ValueError: a bad device id.
    """
    own = [device_topic(device_id, k) for k in ("state", "reply", "events", "telemetry")]
    return Acl(
        publish=(*own, ARTIFACT_REQUESTS, f"{PREFIX}/node/+/infer/+", f"{PREFIX}/dev/+/inbox/infer"),
        subscribe=tuple(f for f, _ in device_subscriptions(device_id)),
    )


# -- parsing -----------------------------------------------------------------------------


def parse(topic: str) -> TopicInfo:
    """What a received ``topic`` is: its kind and the ids in it.

    Raises:
        ValueError: not one of the protocol's topics, or an id in it is invalid.
    """
    if not isinstance(topic, str) or not topic.startswith(PREFIX + "/"):
        raise ValueError(f"not a fleet topic: {topic!r}")
    levels = topic[len(PREFIX) + 1:].split("/")
    head, n = levels[0], len(levels)
    if head == "dev" and n >= 3:
        device = check_id(levels[1], "device id")
        kind = levels[2]
        if n == 3 and kind in DEVICE_KINDS:
            return TopicInfo(kind=kind, device=device)
        if kind == "inbox" and n == 4 and levels[3] == "infer":
            return TopicInfo(kind="infer_inbox", device=device)
        if kind == "inbox" and n == 5 and levels[3] == "chunk":
            return TopicInfo(kind="chunk_inbox", device=device, sha256=check_sha256(levels[4]))
    elif head == "artifacts" and n == 3 and levels[2] == "req":
        return TopicInfo(kind="artifact_req", sha256=check_sha256(levels[1]))
    elif head == "node" and n == 4 and levels[2] == "infer":
        return TopicInfo(kind="infer", node=check_id(levels[1], "node id"), model=check_id(levels[3], "model name"))
    elif head == "trust" and n == 3 and levels[1] == "root":
        if _VERSION_RE.fullmatch(levels[2]) is None:
            raise ValueError(f"invalid root version in topic {topic!r}")
        return TopicInfo(kind="trust_root", version=check_root_version(int(levels[2])))
    elif head == "ctl":
        if levels == ["ctl", "state"]:
            return TopicInfo(kind="ctl_state")
        if levels == ["ctl", "api", "req"]:
            return TopicInfo(kind="api_req")
        if n == 4 and levels[1:3] == ["api", "reply"]:
            return TopicInfo(kind="api_reply", client=check_id(levels[3], "client id"))
    raise ValueError(f"not a fleet topic: {topic!r}")


def build(info: TopicInfo) -> str:
    """The topic ``parse`` read ``info`` from (``build(parse(t)) == t``).

    Raises:
        ValueError: an unknown kind, or missing or invalid ids.
    """
    k = info.kind
    if k in DEVICE_KINDS:
        return device_topic(info.device, k)  # type: ignore[arg-type]
    if k == "chunk_inbox":
        return chunk_inbox(info.device, info.sha256)  # type: ignore[arg-type]
    if k == "infer_inbox":
        return infer_inbox(info.device)  # type: ignore[arg-type]
    if k == "artifact_req":
        return artifact_request(info.sha256)  # type: ignore[arg-type]
    if k == "infer":
        return infer(info.node, info.model)  # type: ignore[arg-type]
    if k == "ctl_state":
        return CTL_STATE
    if k == "api_req":
        return API_REQUEST
    if k == "api_reply":
        return api_reply(info.client)  # type: ignore[arg-type]
    if k == "trust_root":
        return trust_root(info.version)  # type: ignore[arg-type]
    raise ValueError(f"unknown topic kind {k!r}")
