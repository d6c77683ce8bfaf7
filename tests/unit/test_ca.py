"""The fleet CA (``controller/ca.py``, ``fleetctl ca``): chains verify (cryptography's
verifier, ``openssl verify`` when present, and a real TLS handshake), each role gets its
extended key usages and names, keys are 0600, and every bad input or broken file is a typed
error that changes nothing."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store

from controller.ca import (
    ROLES,
    CABusy,
    CACorrupt,
    CAError,
    CAExists,
    CAMissing,
    CANameTaken,
    CAPassphraseError,
    CASpecError,
    FleetCA,
    Issued,
    read_ledger,
)
from controller.cli import main

CLIENT, SERVER = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH


@pytest.fixture(scope="module")
def shared_ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    """One CA for the read-only checks (key generation is cheap, but one is enough)."""
    return FleetCA.init(tmp_path_factory.mktemp("ca") / "ca")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name != ".lock"}


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def ext(cert: x509.Certificate, cls: type) -> Any:
    return cert.extensions.get_extension_for_class(cls)


def store(ca: FleetCA) -> PolicyBuilder:
    return PolicyBuilder().store(Store([load(ca.cert_pem)]))


# -- the CA itself --------------------------------------------------------------------------


def test_init_writes_a_ca_certificate_and_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    ca = FleetCA.init(tmp_path / "ca", common_name="test fleet", valid_days=30)
    assert ca.ca_file == tmp_path / "ca" / "ca.pem"
    assert ca.ca_file.read_bytes() == ca.cert_pem
    assert mode(tmp_path / "ca") == 0o700
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    assert mode(ca.ca_file) == 0o644
    assert b"BEGIN PRIVATE KEY" in (tmp_path / "ca" / "ca.key").read_bytes()  # unencrypted without a passphrase
    cert = load(ca.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test fleet"
    assert cert.issuer == cert.subject
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert ext(cert, x509.SubjectKeyIdentifier).value.digest
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    now = datetime.now(timezone.utc)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc <= now + timedelta(days=30)
    assert read_ledger(tmp_path / "ca") == []
    reopened = FleetCA.open(tmp_path / "ca")
    assert reopened.cert_pem == ca.cert_pem


def test_init_refuses_a_directory_that_holds_a_ca_and_changes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    FleetCA.init(d).issue("d1", "device")
    before = snapshot(d)
    with pytest.raises(CAExists) as err:
        FleetCA.init(d)
    assert err.value.code == "ca_error" and err.value.to_dict()["reason"] == "exists"
    assert "another --dir" in str(err.value)
    assert snapshot(d) == before


def test_init_after_an_interrupted_init_says_what_to_remove(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    FleetCA.init(d)
    (d / "ca.pem").unlink()  # a crash between the key and the certificate
    with pytest.raises(CAExists, match="interrupted.*remove"):
        FleetCA.init(d)
    with pytest.raises(CAMissing, match="ca.pem"):
        FleetCA.open(d)


@pytest.mark.parametrize("kwargs, match", [
    ({"valid_days": 0}, "between 1 and"),
    ({"valid_days": 100_000}, "between 1 and"),
    ({"common_name": ""}, "common name"),
    ({"passphrase": ""}, "empty"),
])
def test_init_refuses_bad_arguments_and_writes_nothing(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(CAError, match=match):
        FleetCA.init(tmp_path / "ca", **kwargs)
    assert not (tmp_path / "ca").exists()


# -- passphrases and broken files -----------------------------------------------------------


def test_a_passphrase_encrypts_the_key_and_is_needed_to_open_it(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    FleetCA.init(d, passphrase="correct horse")
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in (d / "ca.key").read_bytes()
    assert mode(d / "ca.key") == 0o600
    before = snapshot(d)
    cases: list[tuple[Any, type, str]] = [(None, CAPassphraseError, "passphrase_required"),
                                          ("wrong", CAPassphraseError, "wrong_passphrase"),
                                          ("", CAPassphraseError, "passphrase")]
    for passphrase, exc, reason in cases:
        with pytest.raises(exc) as err:
            FleetCA.open(d, passphrase=passphrase)
        assert err.value.to_dict()["reason"] == reason, passphrase
    assert snapshot(d) == before
    ca = FleetCA.open(d, passphrase="correct horse")
    issued = ca.issue("d1", "device")
    store(ca).build_client_verifier().verify(load(issued.cert_pem), [])


def _garbage(d: Path) -> None:
    (d / "ca.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")


def _truncated_key(d: Path) -> None:
    (d / "ca.key").write_bytes((d / "ca.key").read_bytes()[:60])


def _other_ca_key(d: Path) -> None:
    other = FleetCA.init(d.parent / "other")
    shutil.copy(d.parent / "other" / "ca.key", d / "ca.key")
    assert other.ca_file.exists()


def _leaf_as_ca(d: Path) -> None:
    issued = FleetCA.open(d).issue("d9", "device")
    (d / "ca.pem").write_bytes(issued.cert_pem)


def _rsa_key(d: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (d / "ca.key").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))


def _no_key(d: Path) -> None:
    (d / "ca.key").unlink()


BROKEN: dict[str, tuple[Callable[[Path], None], type, str]] = {
    "certificate not PEM": (_garbage, CACorrupt, "not a PEM certificate"),
    "key truncated": (_truncated_key, CACorrupt, "not a PEM private key"),
    "key of another CA": (_other_ca_key, CACorrupt, "not the key of"),
    "a leaf in place of the CA": (_leaf_as_ca, CACorrupt, "not a CA certificate"),
    "an RSA key": (_rsa_key, CACorrupt, "expected an EC key"),
    "key missing": (_no_key, CAMissing, "ca.key"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_ca_directory_is_a_typed_error_and_stays_as_it_was(tmp_path: Path, case: str) -> None:
    breaker, exc, match = BROKEN[case]
    d = tmp_path / "ca"
    FleetCA.init(d)
    breaker(d)
    before = snapshot(d)
    with pytest.raises(exc, match=match):
        FleetCA.open(d)
    assert snapshot(d) == before
    assert main(["ca", "issue", "d1", "--role", "device", "--dir", str(d), "--out", str(tmp_path / "out")]) == 1
    assert snapshot(d) == before and not (tmp_path / "out").exists()


def test_open_of_a_directory_without_a_ca_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(CAMissing, match="fleetctl ca init"):
        FleetCA.open(tmp_path / "nothing")
    with pytest.raises(CAMissing):
        read_ledger(tmp_path / "nothing")


def test_a_corrupt_ledger_line_is_reported_with_its_number(tmp_path: Path) -> None:
    ca = FleetCA.init(tmp_path / "ca")
    ca.issue("d1", "device")
    with open(tmp_path / "ca" / "issued.jsonl", "a") as f:
        f.write("[1, 2]\n")
    with pytest.raises(CACorrupt, match="line 2"):
        read_ledger(tmp_path / "ca")


def test_issue_while_another_process_holds_the_lock_is_busy(tmp_path: Path) -> None:
    ca = FleetCA.init(tmp_path / "ca")
    fd = os.open(tmp_path / "ca" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(CABusy, match="retry"):
            ca.issue("d1", "device")
    finally:
        os.close(fd)
    assert read_ledger(tmp_path / "ca") == []
    ca.issue("d1", "device")
    assert [r["name"] for r in read_ledger(tmp_path / "ca")] == ["d1"]


# -- leaf certificates ----------------------------------------------------------------------

EXPECTED_EKU = {"device": [CLIENT], "controller": [CLIENT], "operator": [CLIENT], "broker": [SERVER, CLIENT]}


@pytest.mark.parametrize("role", ROLES)
def test_each_role_gets_its_usages_names_and_a_chain_that_verifies(shared_ca: FleetCA, role: str, tmp_path: Path) -> None:
    hosts = ["broker.fleet.test", "127.0.0.1", "::1"] if role == "broker" else []
    issued = shared_ca.issue(f"{role}-1", role, valid_days=30, hosts=hosts)
    assert isinstance(issued, Issued) and issued.name == f"{role}-1" and issued.role == role
    cert = load(issued.cert_pem)
    assert cert.serial_number == issued.serial and 0 < issued.serial < 2**128
    assert cert.not_valid_after_utc == issued.not_after
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"{role}-1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
    assert cert.issuer == load(shared_ca.cert_pem).subject
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == EXPECTED_EKU[role]
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert ext(cert, x509.KeyUsage).value.digital_signature
    ca_ski = ext(load(shared_ca.cert_pem), x509.SubjectKeyIdentifier).value.digest
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski
    assert ext(cert, x509.SubjectKeyIdentifier).value.digest != ca_ski
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:edgefleet:{role}:{role}-1"]
    # Valid a few minutes in the past already (a device clock a little behind still accepts it).
    now = datetime.now(timezone.utc)
    assert cert.not_valid_before_utc <= now - timedelta(minutes=4)
    assert now + timedelta(days=29) < cert.not_valid_after_utc <= now + timedelta(days=30)

    builder = store(shared_ca)
    chain = builder.build_client_verifier().verify(cert, []).chain  # cryptography's verifier (RFC 5280)
    assert [c.subject for c in chain] == [cert.subject, load(shared_ca.cert_pem).subject]
    if role == "broker":
        assert san.get_values_for_type(x509.DNSName) == ["broker.fleet.test"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
        import ipaddress

        builder.build_server_verifier(DNSName("broker.fleet.test")).verify(cert, [])
        builder.build_server_verifier(IPAddress(ipaddress.ip_address("127.0.0.1"))).verify(cert, [])
        with pytest.raises(Exception, match="(?i)subject|name|san"):
            builder.build_server_verifier(DNSName("elsewhere.test")).verify(cert, [])
    else:
        assert not san.get_values_for_type(x509.DNSName)
        with pytest.raises(Exception):  # a client certificate cannot serve TLS
            builder.build_server_verifier(DNSName(f"{role}-1")).verify(cert, [])

    if shutil.which("openssl"):
        paths = shared_ca.write(issued, tmp_path)
        purpose = "sslserver" if role == "broker" else "sslclient"
        for p in (purpose, "sslclient"):
            out = subprocess.run(["openssl", "verify", "-purpose", p, "-CAfile", str(shared_ca.ca_file), str(paths["cert"])],
                                 capture_output=True, text=True, check=False)
            assert out.returncode == 0 and ": OK" in out.stdout, out.stdout + out.stderr
        if role != "broker":
            out = subprocess.run(["openssl", "verify", "-purpose", "sslserver", "-CAfile", str(shared_ca.ca_file),
                                  str(paths["cert"])], capture_output=True, text=True, check=False)
            assert out.returncode != 0


def test_a_leaf_never_outlives_the_ca(tmp_path: Path) -> None:
    ca = FleetCA.init(tmp_path / "ca", valid_days=10)
    issued = ca.issue("d1", "device", valid_days=825)
    assert issued.not_after == load(ca.cert_pem).not_valid_after_utc


def test_serials_are_random_and_the_ledger_lists_every_certificate(tmp_path: Path) -> None:
    ca = FleetCA.init(tmp_path / "ca")
    issued = [ca.issue("d1", "device"), ca.issue("d1", "device"), ca.issue("mq", "broker", hosts=["localhost"])]
    assert len({i.serial for i in issued}) == 3
    rows = read_ledger(tmp_path / "ca")
    assert [(r["name"], r["role"], int(r["serial"], 16), r["hosts"]) for r in rows] == [
        (i.name, i.role, i.serial, ["localhost"] if i.role == "broker" else []) for i in issued]
    assert all(r["not_after"] == i.not_after.strftime("%Y-%m-%dT%H:%M:%SZ") for r, i in zip(rows, issued))


@pytest.mark.parametrize("name, role, hosts, match", [
    ("bad/name", "device", [], "invalid certificate name"),
    ("", "device", [], "invalid certificate name"),
    ("-leading-dash", "device", [], "invalid certificate name"),
    ("x" * 65, "device", [], "invalid certificate name"),
    ("d1", "admin", [], "unknown role"),
    ("d1", "device", ["host.test"], "broker certificates only"),
    ("mq", "broker", [], "needs the names"),
    ("mq", "broker", ["two words"], "not a DNS name"),
    ("mq", "broker", ["*.wild.test"], "not a DNS name"),
])
def test_issue_refuses_bad_arguments_and_records_nothing(tmp_path: Path, name: str, role: str, hosts: list[str],
                                                         match: str) -> None:
    ca = FleetCA.init(tmp_path / "ca")
    before = snapshot(tmp_path / "ca")
    with pytest.raises(CASpecError, match=match):
        ca.issue(name, role, hosts=hosts)
    with pytest.raises(CASpecError, match="between 1 and"):
        ca.issue("d1", "device", valid_days=0)
    assert snapshot(tmp_path / "ca") == before


# One name, one role: (what the ledger holds, what is asked for) -> refused (the role the
# name is taken by) or allowed (None). Mosquitto takes the identity from the CN and cannot
# read the OU, so a second role under one name would get the first one's broker rights.
ONE_NAME_ONE_ROLE: dict[str, tuple[list[tuple[str, str]], tuple[str, str], "str | None"]] = {
    "a device named like a controller": ([("ctl-a", "controller")], ("ctl-a", "device"), "controller"),
    "a controller named like a device": ([("dev-1", "device")], ("dev-1", "controller"), "device"),
    "an operator named like a broker": ([("mq", "broker")], ("mq", "operator"), "broker"),
    "a broker named like an operator": ([("op-1", "operator")], ("op-1", "broker"), "operator"),
    "taken by any earlier row": ([("dev-1", "device"), ("dev-1", "device"), ("ctl-a", "controller")],
                                 ("dev-1", "operator"), "device"),
    "renewal in the same role": ([("dev-1", "device")], ("dev-1", "device"), None),
    "a broker renewed": ([("mq", "broker"), ("dev-1", "device")], ("mq", "broker"), None),
    "names differ only in case": ([("ctl-a", "controller")], ("CTL-A", "device"), None),
}


@pytest.mark.parametrize("case", ONE_NAME_ONE_ROLE)
def test_a_name_keeps_its_role(tmp_path: Path, case: str) -> None:
    held, (name, role), taken_by = ONE_NAME_ONE_ROLE[case]
    ca = FleetCA.init(tmp_path / "ca")
    for n, r in held:
        ca.issue(n, r, hosts=["localhost"] if r == "broker" else [])
    hosts = ["localhost"] if role == "broker" else []
    before = snapshot(tmp_path / "ca")
    if taken_by is None:
        issued = ca.issue(name, role, hosts=hosts)
        assert [(r["name"], r["role"], r["serial"]) for r in read_ledger(tmp_path / "ca")][-1] == (
            name, role, f"{issued.serial:x}")
        return
    with pytest.raises(CANameTaken) as err:
        ca.issue(name, role, hosts=hosts)
    exc = err.value
    assert isinstance(exc, CAError) and exc.reason == "name_taken" and exc.to_dict()["reason"] == "name_taken"
    assert (exc.name, exc.role) == (name, taken_by)
    first = next(r for r in read_ledger(tmp_path / "ca") if r["name"] == name)
    assert exc.serial == first["serial"] and first["serial"] in str(exc)
    assert f"already has a {taken_by} certificate" in str(exc) and "choose another name" in str(exc)
    assert snapshot(tmp_path / "ca") == before  # nothing recorded


def test_fleetctl_ca_issue_refuses_a_name_in_another_role_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, out = tmp_path / "ca", tmp_path / "out"
    FleetCA.init(d).issue("ctl-a", "controller")
    before = snapshot(d)
    assert main(["ca", "issue", "ctl-a", "--role", "device", "--dir", str(d), "--out", str(out), "--json"]) == 1
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["type"] == "ca_error" and err["reason"] == "name_taken" and "controller" in err["message"]
    assert snapshot(d) == before and not out.exists()


def test_issue_refuses_to_guess_past_a_ledger_it_cannot_read(tmp_path: Path) -> None:
    """The ledger is the only record of which role holds a name: unreadable, it checks nothing."""
    ca = FleetCA.init(tmp_path / "ca")
    ca.issue("ctl-a", "controller")
    with open(tmp_path / "ca" / "issued.jsonl", "ab") as f:
        f.write(b"not json\n")
    before = snapshot(tmp_path / "ca")
    with pytest.raises(CACorrupt, match="line 2"):
        ca.issue("ctl-a", "device")
    with pytest.raises(CACorrupt, match="line 2"):
        ca.issue("dev-1", "device")
    assert snapshot(tmp_path / "ca") == before


def test_write_puts_the_key_at_0600_and_the_certificate_at_0644(shared_ca: FleetCA, tmp_path: Path) -> None:
    issued = shared_ca.issue("d1", "device")
    paths = shared_ca.write(issued, tmp_path / "out" / "deep")
    assert paths == {"cert": tmp_path / "out" / "deep" / "d1.pem", "key": tmp_path / "out" / "deep" / "d1.key"}
    assert mode(paths["key"]) == 0o600 and mode(paths["cert"]) == 0o644
    assert paths["key"].read_bytes() == issued.key_pem and paths["cert"].read_bytes() == issued.cert_pem
    assert b"BEGIN PRIVATE KEY" in issued.key_pem  # a device starts unattended: no passphrase
    again = shared_ca.write(issued, tmp_path / "out", stem="device")
    assert again == {"cert": tmp_path / "out" / "device.pem", "key": tmp_path / "out" / "device.key"}
    with pytest.raises(CASpecError):
        shared_ca.write(issued, tmp_path / "out", stem="../escape")


# -- the certificates in a real TLS handshake -----------------------------------------------


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_name: str) -> tuple[Any, Any]:
    """One TLS handshake over loopback; (server result, client result): a peer certificate
    subject or the exception each side raised."""
    results: dict[str, Any] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)  # a safety net against a hang, not a timing assertion
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    results["server"] = dict(x[0] for x in tls.getpeercert()["subject"])  # type: ignore[index]
                    tls.sendall(b"ok")
            except Exception as exc:  # noqa: BLE001 - reported to the test
                results["server"] = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                results["client"] = tls.recv(2)
        except Exception as exc:  # noqa: BLE001
            results["client"] = exc
        thread.join(30)
    return results.get("server"), results.get("client")


def test_a_device_and_a_broker_certificate_complete_a_mutual_tls_handshake(tmp_path: Path) -> None:
    ca = FleetCA.init(tmp_path / "ca")
    broker = ca.write(ca.issue("mq", "broker", hosts=["localhost", "127.0.0.1"]), tmp_path / "b")
    device = ca.write(ca.issue("dev-7", "device"), tmp_path / "d")

    def server_ctx(trust: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(broker["cert"], broker["key"])
        ctx.load_verify_locations(trust)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_ctx(cert: dict[str, Path], trust: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(trust))
        ctx.load_cert_chain(cert["cert"], cert["key"])
        return ctx

    server, client = _handshake(server_ctx(ca.ca_file), client_ctx(device, ca.ca_file), "127.0.0.1")
    assert client == b"ok", client
    assert server == {"commonName": "dev-7", "organizationalUnitName": "device", "organizationName": "edgefleet"}

    # A device certificate from another CA is refused by the broker.
    other = FleetCA.init(tmp_path / "other")
    stranger = other.write(other.issue("dev-7", "device"), tmp_path / "s")
    server, client = _handshake(server_ctx(ca.ca_file), client_ctx(stranger, ca.ca_file), "127.0.0.1")
    assert isinstance(server, ssl.SSLError), server
    # A device certificate cannot pose as the broker (no serverAuth, no host name).
    fake = {"cert": device["cert"], "key": device["key"]}
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(fake["cert"], fake["key"])
    server, client = _handshake(ctx, client_ctx(device, ca.ca_file), "127.0.0.1")
    assert isinstance(client, ssl.SSLError), client


# -- fleetctl ca ----------------------------------------------------------------------------


def test_fleetctl_ca_init_issue_ls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, out = tmp_path / "ca", tmp_path / "out"
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    assert main(["ca", "init", "--dir", str(d), "--passphrase-file", str(pw), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ca_file"] == str(d / "ca.pem") and len(info["sha256"]) == 64

    assert main(["ca", "issue", "dev-1", "--role", "device", "--dir", str(d), "--out", str(out)]) == 1
    assert "passphrase" in capsys.readouterr().err
    args = ["--dir", str(d), "--passphrase-file", str(pw), "--out", str(out), "--json"]
    assert main(["ca", "issue", "dev-1", "--role", "device", *args]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["cert"] == str(out / "dev-1.pem") and mode(out / "dev-1.key") == 0o600
    assert main(["ca", "issue", "mq", "--role", "broker", "--host", "localhost", "--days", "30", *args]) == 0
    capsys.readouterr()
    assert main(["ca", "issue", "mq2", "--role", "broker", *args]) == 1
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["type"] == "ca_error" and err["reason"] == "invalid" and "--host" in err["message"]

    assert main(["ca", "ls", "--dir", str(d), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["issued"]
    assert [(r["name"], r["role"]) for r in rows] == [("dev-1", "device"), ("mq", "broker")]
    assert main(["ca", "ls", "--dir", str(d)]) == 0
    text = capsys.readouterr().out
    assert "dev-1" in text and "broker" in text and "localhost" in text

    assert main(["ca", "init", "--dir", str(d)]) == 1
    assert "already holds a CA" in capsys.readouterr().err
