"""A throwaway PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` in a temp dir, on a free
loopback port, trust auth on loopback, no fsync (nothing here needs to survive).

    cluster = PgCluster.start()          # raises PgUnavailable when initdb is not installed
    url = cluster.create_database()      # postgresql+psycopg://postgres@127.0.0.1:PORT/t_...
    cluster.stop()                       # pg_ctl -m immediate stop, the directory removed

initdb refuses to run as root (CI runs as root): then the cluster belongs to ``nobody``
(``runuser -u nobody --``, or ``setpriv``), in a directory chowned to it under /tmp (a
pytest tmp dir under /tmp/pytest-of-root is not reachable by another user).

Debian's ``postgresql`` package puts the binaries in /usr/lib/postgresql/NN/bin, not on
PATH: ``pg_bin_dir()`` looks there first (newest NN), then PATH. ``.ci/run`` installs the
package when it is missing.

The helpers do not need pytest. The fixtures at the bottom -- ``pg_cluster`` (one per
session, i.e. per xdist worker) and ``pg_url`` (a fresh database per test, dropped after)
-- are used from a test module or conftest with:

    from tests.pg import pg_cluster, pg_url  # noqa: F401
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from tests.helpers import free_port

SUPERUSER = "postgres"
RUN_AS = "nobody"  # when we are root


class PgUnavailable(RuntimeError):
    """PostgreSQL's server binaries are not installed."""


class PgError(RuntimeError):
    """The cluster would not start (the message carries the server's log)."""


def pg_bin_dir() -> Optional[str]:
    """The directory holding ``initdb`` and ``pg_ctl``: Debian's /usr/lib/postgresql/NN/bin
    (newest NN), else wherever PATH finds initdb. None when not installed."""
    def major(path: str) -> int:
        try:
            return int(Path(path).parts[-3])
        except ValueError:
            return -1
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major, reverse=True):
        if os.access(found, os.X_OK):
            return os.path.dirname(found)
    which = shutil.which("initdb")
    if which:
        real = os.path.realpath(which)  # /usr/local/bin/initdb may be a link into the real bin dir
        for candidate in (os.path.dirname(real), os.path.dirname(which)):
            if os.access(os.path.join(candidate, "pg_ctl"), os.X_OK):
                return candidate
    return None




class PgCluster:
    """One running cluster. ``start()`` builds it; ``stop()`` removes everything."""

    def __init__(self, root: Path, bin_dir: str, port: int, user: Optional[str]) -> None:
        self.root = root
        self.data = root / "data"
        self.sockets = root / "sock"
        self.log = root / "postgres.log"
        self.bin_dir = bin_dir
        self.port = port
        self._user = user  # run the server binaries as this OS user (None: as ourselves)

    @property
    def base_url(self) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}"

    def url(self, database: str = "postgres") -> str:
        return f"{self.base_url}/{database}"

    @classmethod
    def start(cls, *, attempts: int = 3) -> "PgCluster":
        """initdb a new cluster and start it on a free port (another pick when the port was
        taken meanwhile).

        Raises:
            PgUnavailable: initdb is not installed. PgError: the server did not start.
        """
        bin_dir = pg_bin_dir()
        if bin_dir is None:
            raise PgUnavailable("PostgreSQL's initdb was not found in /usr/lib/postgresql/*/bin nor on PATH "
                                "(Debian: apt-get install postgresql; .ci/run does)")
        user = RUN_AS if os.geteuid() == 0 else None
        root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-", dir="/tmp"))
        cluster = cls(root, bin_dir, free_port(), user)
        try:
            if user is not None:
                pw = pwd.getpwnam(user)
                os.chown(root, pw.pw_uid, pw.pw_gid)
            cluster._as_owner(["mkdir", "-m", "0700", str(cluster.sockets)])
            cluster._as_owner([cluster._bin("initdb"), "-D", str(cluster.data), "-U", SUPERUSER, "-A", "trust",
                               "-E", "UTF8", "--locale=C", "--no-sync"])
            for attempt in range(attempts):
                try:
                    cluster._pg_ctl_start()
                    break
                except PgError:
                    if attempt + 1 == attempts:
                        raise
                    cluster.port = free_port()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _bin(self, name: str) -> str:
        return os.path.join(self.bin_dir, name)

    def _as_owner(self, cmd: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        if self._user is not None:
            if shutil.which("runuser"):
                cmd = ["runuser", "-u", self._user, "--", *cmd]
            else:
                pw = pwd.getpwnam(self._user)
                cmd = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *cmd]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGDATA", None)
        # cwd: a directory the owner may enter (ours may be root's 0700 home).
        proc = subprocess.run(cmd, cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise PgError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def _pg_ctl_start(self) -> None:
        opts = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100 "
                "-c shared_buffers=32MB")
        try:
            self._as_owner([self._bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
                            "-w", "-t", "30", "start"])
        except PgError as exc:
            raise PgError(f"{exc}\n--- server log ---\n{self.server_log()}") from None

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def execute(self, sql: str, database: str = "postgres") -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname=database,
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self, name: Optional[str] = None, *, template: Optional[str] = None) -> str:
        """A new database (empty, or a copy of ``template``: a database with tables already
        made is the cheapest way to give every test its own); returns its SQLAlchemy URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:16]}"
        sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
        for attempt in range(50):
            try:  # PostgreSQL 15+: a file copy is several times faster than WAL_LOG
                self.execute(sql + " STRATEGY = FILE_COPY")
            except psycopg.errors.SyntaxError:
                self.execute(sql)
            except psycopg.errors.ObjectInUse:
                # The template's last session is still closing (a client just disconnected).
                if attempt == 49:
                    raise
                time.sleep(0.02)
                continue
            return self.url(name)
        raise AssertionError("unreachable")  # pragma: no cover

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop at once (``-m immediate``) and remove the directory; safe to call twice."""
        if (self.data / "postmaster.pid").exists():
            try:
                self._as_owner([self._bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                               timeout=30)
            except (PgError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def wait_for(cluster: PgCluster, timeout: float = 10.0) -> None:
    """Until a connection works (pg_ctl -w already waits; for callers that restart it)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(host="127.0.0.1", port=cluster.port, user=SUPERUSER, dbname="postgres",
                                 connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- pytest fixtures (import-safe without pytest installed) ------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the helpers above work without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def pg_cluster() -> Iterator[PgCluster]:
        """One running cluster per session (per xdist worker); skipped without initdb."""
        try:
            cluster = PgCluster.start()
        except PgUnavailable as exc:
            pytest.skip(str(exc))
        try:
            yield cluster
        finally:
            cluster.stop()

    @pytest.fixture
    def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
        """A fresh, empty database per test, as a ``postgresql+psycopg://`` URL (dropped after)."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        url = pg_cluster.create_database(name)
        yield url
        try:
            pg_cluster.drop_database(name)
        except Exception:  # noqa: BLE001 - a leftover database goes with the cluster anyway
            pass


__all__: list[Any] = ["PgCluster", "PgUnavailable", "PgError", "pg_bin_dir", "free_port", "wait_for"]
