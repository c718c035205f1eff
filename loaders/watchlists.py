"""`kapman watchlists load`: watchlist text files are the source of truth for their watchlist."""

from __future__ import annotations

import logging
from pathlib import Path

from .db import Database

log = logging.getLogger(__name__)


class WatchlistFileError(ValueError):
    """A watchlist file could not be read; nothing from it was loaded."""


def parse_watchlist(path: Path) -> list[str]:
    """Symbols of one file: one per line, `#` starts a comment, trimmed, upper-cased, deduplicated."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WatchlistFileError(f"cannot read watchlist file {path}: {exc.__class__.__name__}: {exc}") from None
    symbols: dict[str, None] = {}
    for line in text.splitlines():
        symbol = line.split("#", 1)[0].strip().upper()
        if symbol:
            symbols[symbol] = None
    return list(symbols)


def load_watchlist(db: Database, path: Path) -> dict[str, int]:
    """Upsert one file's symbols as active and deactivate the watchlist's symbols no longer in it."""
    symbols = parse_watchlist(path)
    watchlist_id = path.stem
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute(
            "insert into watchlists (watchlist_id, symbol, active, source, effective_date)"
            " select %s, s, true, %s, current_date from unnest(%s::text[]) as s"
            " on conflict (watchlist_id, symbol) do update set active = true, source = excluded.source,"
            " updated_at = now() where not watchlists.active or watchlists.source is distinct from excluded.source",
            (watchlist_id, str(path), symbols),
        )
        upserted = cur.rowcount
        cur.execute(
            "update watchlists set active = false, updated_at = now()"
            " where watchlist_id = %s and active and not (symbol = any(%s::text[]))",
            (watchlist_id, symbols),
        )
        deactivated = cur.rowcount
    log.info(
        "watchlist %s: %d symbols (%d added or reactivated, %d deactivated)",
        watchlist_id, len(symbols), upserted, deactivated,
    )
    return {"symbols": len(symbols), "changed": upserted, "deactivated": deactivated}


def load_watchlists(db: Database, paths: list[Path]) -> int:
    """Load every file; an unreadable file is reported by name and skipped. Returns the exit code."""
    failed = 0
    for path in paths:
        try:
            load_watchlist(db, path)
        except WatchlistFileError as exc:
            log.error("%s", exc)
            failed += 1
    return 1 if failed else 0
