"""A throw-away PostgreSQL server for tests and benchmarks: Debian's binaries on a temp data dir.

initdb + pg_ctl on a free port of 127.0.0.1, password (SCRAM) authentication over TCP, so a
wrong password fails the way it does against a production server. As root the server runs
as the `postgres` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
USER, PASSWORD, DATABASE = "scorer", "s3cret-for-tests", "hr"


def binaries() -> Path | None:
    """The newest installed PostgreSQL bin directory, or None."""
    found = [d for d in BIN_DIRS if (d / "initdb").exists() and (d / "pg_ctl").exists()]
    return found[0] if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """Start with `with PostgresServer() as pg:`; `pg.uri()` is a password-less URI for USER."""

    def __init__(self) -> None:
        bin_dir = binaries()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin")
        self.bin = bin_dir
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pg-test-"))
        self.data = self.root / "data"
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str, input_text: str | None = None) -> str:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, input=input_text, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stderr or done.stdout}")
        return done.stdout.rstrip("\n")

    def start(self) -> PostgresServer:
        if self.as_root:
            shutil.chown(self.root, "postgres")
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_root:
            shutil.chown(pwfile, "postgres")
        # Superuser = USER with a password; TCP needs it (scram), the socket in root/ does not.
        self._run(
            "initdb", "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile), "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} -c fsync=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")
        self.sql(f"CREATE DATABASE {DATABASE}", database="postgres")
        return self

    def sql(self, statement: str, database: str = DATABASE) -> str:
        """Run SQL through psql on the local socket (no password): test set-up and inspection."""
        return self._run(
            "psql", "-h", str(self.root), "-p", str(self.port), "-U", USER, "-d", database,
            "-v", "ON_ERROR_STOP=1", "-At", "-c", statement,
        )  # fmt: skip

    def uri(self, database: str = DATABASE) -> str:
        """No password in it: libpq takes it from PGPASSWORD, as the product asks users to."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
