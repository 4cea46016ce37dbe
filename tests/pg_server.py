"""A throwaway PostgreSQL cluster for tests: initdb in a temp dir, one port, torn down after.

PostgreSQL refuses to run as root, so as root its commands run as the ``postgres`` OS user
(``runuser``) in directories owned by it. ``find_bindir`` locates ``initdb`` through
``pg_config --bindir`` or ``/usr/lib/postgresql/*/bin``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import psycopg


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None if PostgreSQL is absent."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for path in candidates:
        if path and (Path(path) / "initdb").is_file():
            return Path(path)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One PostgreSQL cluster on 127.0.0.1:``port`` (fsync on) for the test session."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="vera-pg-"))
        self.data, self.log = self.base / "data", self.base / "server.log"
        self.port = _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:  # initdb/postgres refuse root: hand the directory to postgres
            pw = pwd.getpwnam("postgres")
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def _pg(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stderr or out.stdout}")
        return out

    def start(self) -> None:
        """Start (again) on the same port and data; retries while a killed cluster's shared
        memory is still held by its dying backends."""
        opts = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=on "
            "-c max_connections=200"
        )
        for _ in range(20):
            args = ("-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o", opts)
            if self._pg("pg_ctl", *args, "start", check=False).returncode == 0:
                return
            # an earlier attempt's postmaster may be up and still replaying the killed
            # cluster's WAL (slow on a loaded machine): wait for it rather than start another
            running = self._pg("pg_ctl", "-D", str(self.data), "status", check=False)
            if running.returncode == 0 and self._ready(timeout=60):
                return
            time.sleep(0.25)
        raise RuntimeError(f"PostgreSQL did not start; log:\n{self.log.read_text()[-2000:]}")

    def _ready(self, timeout: float) -> bool:
        """Whether the running cluster accepts connections within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.25)
        return False

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend: the database vanishes mid-flight."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)

    def new_database(self, name: str | None = None) -> str:
        """CREATE DATABASE (a unique name by default); return its DSN."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        """Stop the cluster and remove its files."""
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)
