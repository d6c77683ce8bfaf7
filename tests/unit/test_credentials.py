"""controller.credentials: Mosquitto-compatible hashes, the users file, the ACL table, the
Mosquitto files, and the ``fleetctl broker user``/``mosquitto`` commands."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from controller.broker import broker_config
from controller.cli import main as fleetctl
from controller.credentials import (
    BadUser, UserDB, UserExists, UnknownUser, UsersFileError, acl_allows, check_password, hash_password,
    mosquitto_acl, mosquitto_files,
)
from edge_runtime.protocol import topics

SHA = "ab" * 32


# -- hashes ------------------------------------------------------------------------------


def test_hash_is_mosquittos_pbkdf2_sha512_format() -> None:
    h = hash_password("secret", salt=b"0123456789ab")
    tag, iterations, salt, digest = h.split("$")[1:]
    assert (tag, iterations) == ("7", "101")
    assert base64.b64decode(salt) == b"0123456789ab"
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac("sha512", b"secret", b"0123456789ab", 101)
    assert check_password("secret", h) and not check_password("Secret", h)
    assert hash_password("secret") != hash_password("secret")  # a fresh salt each time


def test_hash_written_by_mosquitto_passwd_verifies(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    path = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(path), "alice", "pa ss:word"], check=True, capture_output=True)
    name, encoded = path.read_text().strip().split(":", 1)
    assert name == "alice" and encoded.startswith("$7$101$")
    assert check_password("pa ss:word", encoded)
    assert not check_password("pa ss:wor", encoded)


@pytest.mark.parametrize("encoded", ["", "$6$abc$def", "$7$x$AAAA$AAAA", "$7$101$!!$AAAA", "$7$101$AAAA$AAAA"])
def test_malformed_hashes_never_verify(encoded: str) -> None:
    assert check_password("x", encoded) is False


@pytest.mark.parametrize("password", ["", "two\nlines"])
def test_bad_passwords_are_refused(password: str) -> None:
    with pytest.raises(BadUser):
        hash_password(password)


# -- the users file ----------------------------------------------------------------------


def test_users_round_trip_with_mode_0600(tmp_path: Path) -> None:
    db = UserDB(tmp_path / "users.json")
    db.add("dev-1", "device", "pw1")
    db.add("ctl", "controller", "pw2")
    db.save()
    assert stat.S_IMODE((tmp_path / "users.json").stat().st_mode) == 0o600
    again = UserDB.load(tmp_path / "users.json")
    assert again.verify("dev-1", "pw1") == "device"
    assert again.verify("ctl", "pw2") == "controller"
    assert again.verify("ctl", "pw1") is None
    assert again.verify("nobody", "pw1") is None
    assert again.verify(None, None) is None
    again.remove("ctl")
    again.save()
    assert [u.name for u in UserDB.load(tmp_path / "users.json").users()] == ["dev-1"]


@pytest.mark.parametrize("name", ["a/b", "a+b", "a#b", "", "-lead", "sp ace", "co:lon", "x" * 65, "$sys"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(BadUser):
        UserDB(tmp_path / "u.json").add(name, "device", "pw")


def test_unknown_role_duplicate_and_missing_user(tmp_path: Path) -> None:
    db = UserDB(tmp_path / "u.json")
    with pytest.raises(BadUser, match="expected one of device, controller, console"):
        db.add("x", "admin", "pw")
    db.add("x", "console", "pw")
    with pytest.raises(UserExists, match="remove it first"):
        db.add("x", "device", "pw")
    with pytest.raises(UnknownUser):
        db.remove("y")


def test_saving_keeps_the_group_an_operator_gave_the_users_file(tmp_path: Path) -> None:
    """The broker's service user reads the file through its group: a `user add` run as
    root rewrites it and must keep that group and its read bit, and never open it to others."""
    path = tmp_path / "users.json"
    db = UserDB(path)
    db.add("dev-1", "device", "pw1")
    db.save()
    # root may give it any group (CI runs as root); others one of their own groups
    other_gid = 4242 if os.geteuid() == 0 else next((g for g in os.getgroups() if g != path.stat().st_gid), None)
    os.chmod(path, 0o644)  # too open: the next save takes "others" away
    if other_gid is not None:
        os.chown(path, -1, other_gid)
    db = UserDB.load(path)
    db.add("dev-2", "device", "pw2")
    db.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    if other_gid is not None:
        assert path.stat().st_gid == other_gid
    assert UserDB.load(path).verify("dev-2", "pw2") == "device"


@pytest.mark.parametrize("content", ["not json", "[]", '{"version": 2, "users": {}}',
                                     '{"version": 1, "users": {"a/b": {"role": "device", "hash": "$7$"}}}',
                                     '{"version": 1, "users": {"a": {"role": "device", "hash": "plain"}}}'])
def test_broken_users_files_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "u.json"
    path.write_text(content)
    with pytest.raises(UsersFileError, match="not valid"):
        UserDB.load(path)


def test_missing_users_file_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="fleetctl broker user add"):
        UserDB.load(tmp_path / "nope.json")
    assert len(UserDB.load(tmp_path / "nope.json", missing_ok=True)) == 0


# -- the ACL table -----------------------------------------------------------------------

D1, D2 = "dev-1", "dev-2"
ACL_CASES: list[tuple[str, str, str, str, str, str, bool]] = [
    # (case, role, user, client id, action, topic, allowed)
    ("device publishes own state", "device", D1, D1, "publish", topics.state(D1), True),
    ("device publishes own telemetry", "device", D1, D1, "publish", topics.telemetry(D1), True),
    ("device publishes own events", "device", D1, D1, "publish", topics.events(D1), True),
    ("device publishes own reply", "device", D1, D1, "publish", topics.reply(D1), True),
    ("device publishes another's state", "device", D1, D1, "publish", topics.state(D2), False),
    ("device publishes another's telemetry", "device", D1, D1, "publish", topics.telemetry(D2), False),
    ("device publishes own desired", "device", D1, D1, "publish", topics.desired(D1), False),
    ("device publishes own cmd", "device", D1, D1, "publish", topics.cmd(D1), False),
    ("device publishes ctl/state", "device", D1, D1, "publish", topics.CTL_STATE, False),
    ("device publishes an API request", "device", D1, D1, "publish", topics.API_REQUEST, False),
    ("device requests a chunk", "device", D1, D1, "publish", topics.artifact_request(SHA), True),
    ("device calls an executor", "device", D1, D1, "publish", topics.infer(D2, "m"), True),
    ("device answers a caller's inbox", "device", D1, D1, "publish", topics.infer_inbox(D2), True),
    ("device writes a chunk into an inbox", "device", D1, D1, "publish", topics.chunk_inbox(D2, SHA), False),
    ("device publishes a wildcard", "device", D1, D1, "publish", topics.all_devices("state"), False),
    ("device subscribes own desired", "device", D1, D1, "subscribe", topics.desired(D1), True),
    ("device subscribes own cmd", "device", D1, D1, "subscribe", topics.cmd(D1), True),
    ("device subscribes own inbox", "device", D1, D1, "subscribe", topics.inbox_filter(D1), True),
    ("device subscribes part of own inbox", "device", D1, D1, "subscribe", topics.chunk_inbox(D1, SHA), True),
    ("device subscribes ctl/state", "device", D1, D1, "subscribe", topics.CTL_STATE, True),
    ("device subscribes its executor calls", "device", D1, D1, "subscribe", topics.infer_filter(D1), True),
    ("device subscribes another's desired", "device", D1, D1, "subscribe", topics.desired(D2), False),
    ("device subscribes every desired", "device", D1, D1, "subscribe", topics.all_devices("desired"), False),
    ("device subscribes another's inbox", "device", D1, D1, "subscribe", topics.inbox_filter(D2), False),
    ("device subscribes fleet/v1/#", "device", D1, D1, "subscribe", "fleet/v1/#", False),
    ("device subscribes #", "device", D1, D1, "subscribe", "#", False),
    ("device subscribes shared", "device", D1, D1, "subscribe", topics.shared("g", topics.desired(D1)), False),
    ("device receives own desired", "device", D1, D1, "receive", topics.desired(D1), True),
    ("device receives another's desired", "device", D1, D1, "receive", topics.desired(D2), False),
    ("device with another's client id", "device", D1, D2, "publish", topics.state(D1), False),
    ("device with a '/' client id", "device", D1, "dev-1/x", "publish", topics.state(D1), False),
    ("controller publishes desired", "controller", "ctl", "ctl-1", "publish", topics.desired(D1), True),
    ("controller publishes ctl/state", "controller", "ctl", "ctl-1", "publish", topics.CTL_STATE, True),
    ("controller publishes a reply", "controller", "ctl", "ctl-1", "publish", topics.api_reply("ops-1"), True),
    ("controller publishes outside fleet/v1", "controller", "ctl", "ctl-1", "publish", "other/x", False),
    ("controller subscribes fleet/v1/#", "controller", "ctl", "ctl-1", "subscribe", "fleet/v1/#", True),
    ("controller subscribes #", "controller", "ctl", "ctl-1", "subscribe", "#", False),
    ("controller subscribes $SYS", "controller", "ctl", "ctl-1", "subscribe", "$SYS/#", False),
    *[(f"controller subscribes {f}", "controller", "ctl", "ctl-1", "subscribe", f, True)
      for f, _ in topics.controller_subscriptions("replicas")],
    ("controller with a '+' client id", "controller", "ctl", "ctl+1", "subscribe", "fleet/v1/#", False),
    ("console publishes an API request", "console", "ops", "ops-1", "publish", topics.API_REQUEST, True),
    ("console publishes desired", "console", "ops", "ops-1", "publish", topics.desired(D1), False),
    ("console publishes cmd", "console", "ops", "ops-1", "publish", topics.cmd(D1), False),
    ("console publishes a reply", "console", "ops", "ops-1", "publish", topics.api_reply("ops-1"), False),
    ("console subscribes own reply", "console", "ops", "ops-1", "subscribe", topics.api_reply("ops-1"), True),
    ("console subscribes another's reply", "console", "ops", "ops-1", "subscribe", topics.api_reply("ops-2"), False),
    ("console subscribes all replies", "console", "ops", "ops-1", "subscribe", "fleet/v1/ctl/api/reply/+", False),
    ("console subscribes device state", "console", "ops", "ops-1", "subscribe", topics.all_devices("state"), True),
    ("console subscribes telemetry", "console", "ops", "ops-1", "subscribe", topics.all_devices("telemetry"), True),
    ("console subscribes one device's events", "console", "ops", "ops-1", "subscribe", topics.events(D1), True),
    ("console subscribes ctl/state", "console", "ops", "ops-1", "subscribe", topics.CTL_STATE, True),
    ("console subscribes desired", "console", "ops", "ops-1", "subscribe", topics.all_devices("desired"), False),
    ("console subscribes API requests", "console", "ops", "ops-1", "subscribe", topics.API_REQUEST, False),
    ("console receives another's reply", "console", "ops", "ops-1", "receive", topics.api_reply("ops-2"), False),
    ("unknown role", "admin", "root", "root", "publish", topics.state(D1), False),
    ("unknown action", "controller", "ctl", "ctl-1", "delete", topics.state(D1), False),
    ("invalid filter", "controller", "ctl", "ctl-1", "subscribe", "fleet/v1/#/x", False),
]


@pytest.mark.parametrize("case,role,user,client,action,topic,allowed", ACL_CASES, ids=[c[0] for c in ACL_CASES])
def test_acl_allows(case: str, role: str, user: str, client: str, action: str, topic: str, allowed: bool) -> None:
    assert acl_allows(role, user, client, action, topic) is allowed


def test_no_role_no_access() -> None:
    assert not acl_allows(None, "dev-1", "dev-1", "publish", topics.state("dev-1"))
    assert not acl_allows("device", None, None, "publish", topics.state("dev-1"))


# -- Mosquitto files ---------------------------------------------------------------------


def _db(tmp_path: Path) -> UserDB:
    db = UserDB(tmp_path / "users.json")
    db.add("dev-1", "device", "a")
    db.add("ctl", "controller", "b")
    db.add("ops", "console", "c")
    db.save()
    return db


def test_mosquitto_files(tmp_path: Path) -> None:
    db = _db(tmp_path)
    paths = mosquitto_files(db, tmp_path / "m", port=18883, bind="0.0.0.0")
    passwd = dict(line.split(":", 1) for line in paths["passwd"].read_text().splitlines())
    assert set(passwd) == {"dev-1", "ctl", "ops"}
    assert check_password("a", passwd["dev-1"])
    assert stat.S_IMODE(paths["passwd"].stat().st_mode) == 0o600
    acl = paths["acl"].read_text().splitlines()
    assert "pattern write fleet/v1/dev/%u/state" in acl
    assert "pattern read fleet/v1/dev/%u/desired" in acl
    assert "pattern read fleet/v1/ctl/api/reply/%c" in acl
    assert not any("desired" in line and line.startswith("pattern write") for line in acl)
    assert acl[acl.index("user ctl") + 1] == "topic readwrite fleet/v1/#"
    assert "topic write fleet/v1/ctl/api/req" in acl[acl.index("user ops"):]
    assert "user dev-1" not in acl  # devices are the patterns
    conf = paths["conf"].read_text()
    assert "listener 18883 0.0.0.0" in conf and "allow_anonymous false" in conf
    assert f"password_file {paths['passwd']}" in conf and f"acl_file {paths['acl']}" in conf
    assert mosquitto_acl(db) == paths["acl"].read_text()


# -- CLI ---------------------------------------------------------------------------------


def test_broker_without_users_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert fleetctl(["broker", "--bind", "127.0.0.1:1"]) == 2
    assert "fleetctl broker user add" in capsys.readouterr().err


def test_broker_config_plugins(tmp_path: Path) -> None:
    db = _db(tmp_path)
    cfg = broker_config("127.0.0.1:1883", db.path, tmp_path / "data", False)
    assert cfg["listeners"]["default"]["bind"] == "127.0.0.1:1883"
    assert {"controller.broker.FleetAuthPlugin", "controller.broker.FleetTopicPlugin"} <= set(cfg["plugins"])
    assert "amqtt.plugins.authentication.AnonymousAuthPlugin" not in cfg["plugins"]


def test_user_add_generates_a_password_once_ls_and_rm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = str(tmp_path / "users.json")
    assert fleetctl(["broker", "user", "add", "dev-1", "--role", "device", "--users", users, "--json"]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert UserDB.load(users).verify("dev-1", out["password"]) == "device"
    (tmp_path / "pw").write_text("given\n")
    assert fleetctl(["broker", "user", "add", "ops", "--role", "console", "--users", users,
                     "--password-file", str(tmp_path / "pw")]) == 0
    assert "given" not in capsys.readouterr().out
    assert UserDB.load(users).verify("ops", "given") == "console"
    assert fleetctl(["broker", "user", "ls", "--users", users, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"users": [{"name": "dev-1", "role": "device"},
                                                              {"name": "ops", "role": "console"}]}
    assert fleetctl(["broker", "user", "rm", "ops", "--users", users]) == 0
    assert fleetctl(["broker", "user", "add", "a/b", "--role", "device", "--users", users]) == 1
    assert "invalid user name" in capsys.readouterr().err
    assert fleetctl(["broker", "mosquitto", "--users", users, "--out", str(tmp_path / "m"),
                     "--bind", "127.0.0.1:18884", "--json"]) == 0
    assert "listener 18884 127.0.0.1" in (tmp_path / "m" / "mosquitto.conf").read_text()
