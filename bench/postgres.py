"""A private PostgreSQL server on loopback for the scaling benchmark and the multi-worker tests.

It needs only PostgreSQL's programs (``initdb``, ``pg_ctl``, ``postgres``): a system install
(/usr/lib/postgresql/*/bin) or any other folder holding them, such as the one inside the ``pgserver`` wheel
(``site-packages/pgserver/pginstall/bin``). Password authentication, a random password, a free port; the
server and its data are gone when the context ends.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sweeper.ui import free_port


def find_bindir(hint: str | None = None) -> Path | None:
    """``hint`` if it holds ``initdb``, else the newest system PostgreSQL's programs, else None."""
    if hint:
        return Path(hint) if (Path(hint) / "initdb").exists() else None
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def server_user() -> str | None:
    """PostgreSQL refuses to run as root: then it runs as ``postgres`` (or ``nobody`` where that user is missing)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        return "nobody"


@contextmanager
def loopback_server(bindir: Path, databases: Sequence[str] = ()) -> Iterator[str]:
    """Start a server with ``databases`` created; yields its base URL, ``postgresql://user:password@host:port``."""
    user = server_user()

    def run(cmd: list[str]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["runuser", "-u", user, "--", *cmd] if user else cmd, capture_output=True)

    root = Path(tempfile.mkdtemp(prefix="qlora-pg-"))
    root.chmod(0o755)
    data, pwfile = root / "data", root / "pw"
    password = secrets.token_hex(8)
    pwfile.write_text(password)
    if user:
        shutil.chown(root, user)
        shutil.chown(pwfile, user)
    port = free_port("127.0.0.1")
    try:
        for cmd in ([str(bindir / "initdb"), "-D", str(data), "-U", "sweeper", "--auth=scram-sha-256",
                     f"--pwfile={pwfile}"],
                    [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                     f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"]):
            done = run(cmd)
            if done.returncode != 0:
                log = (root / "log").read_text() if (root / "log").exists() else ""
                raise RuntimeError(f"{Path(cmd[0]).name} failed: {done.stderr.decode()[-2000:]}{log[-2000:]}")
        base = f"postgresql://sweeper:{password}@127.0.0.1:{port}"
        if databases:
            import sqlalchemy

            engine = sqlalchemy.create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                for db in databases:
                    conn.execute(sqlalchemy.text(f"CREATE DATABASE {db}"))
            engine.dispose()
        yield base
    finally:
        run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)
