-- dlt's staging copy of options_chains holds one load's rows only until its MERGE (dlt truncates it
-- before every load; a crash loses nothing the next run needs): unlogged, COPY into it writes no WAL.
alter table public_staging.options_chains set unlogged;
