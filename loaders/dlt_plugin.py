"""dlt CLI plugin: `dlt pipeline run` and `dlt pipeline options_chains run` are `kapman ingest`."""

from __future__ import annotations

import argparse

from dlt.common.configuration import plugins

PIPELINE_NAME = "options_chains"


class IngestCommand:
    """The `run` operation of `dlt pipeline`, with exactly the flags of `kapman ingest`."""

    command = "run"
    parent = "pipeline"
    compose = "replace"
    help_string = "Ingest option-chain snapshots into options_chains (the same command as `kapman ingest`)"
    description = (
        "Fetch each active watchlist symbol's full option chain (Polygon, or the built-in simulator) and "
        "merge it into options_chains. Same flags, behaviour and exit codes as `kapman ingest`."
    )
    docs_url = None

    def configure_parser(self, parser: argparse.ArgumentParser) -> None:
        from .cli import add_ingest_arguments

        self.parser = parser
        add_ingest_arguments(parser)

    def execute(self, args: argparse.Namespace) -> None:
        from . import cli
        from .logs import setup_logging

        name = getattr(args, "pipeline_name", None)
        if name not in (None, PIPELINE_NAME):
            self.parser.error(f"unknown pipeline {name!r}: `run` runs the {PIPELINE_NAME!r} pipeline")
        # dlt consumes -v/--verbose itself (as a count) before this parser sees the arguments.
        args.verbose = bool(getattr(args, "verbose", False) or getattr(args, "verbosity", 0))
        cli.validate_ingest_arguments(self.parser, args)
        setup_logging(verbose=args.verbose, quiet=args.quiet)
        code = cli.dispatch(cli.run_ingest, args)
        if code:
            raise SystemExit(code)  # dlt turns exceptions into -1; exit codes are ours


@plugins.hookimpl(specname="plug_cli")
def plug_cli_kapman_run(host: str) -> type[IngestCommand] | None:
    """Adds `run` under `dlt pipeline` (dlt host only)."""
    return IngestCommand if host == "dlt" else None
