-- Where a row came from: 'snapshot' (the live chain) or 'reconstructed' (a past day rebuilt from
-- Polygon's historical endpoints, shared/spec/history.md). Defaulted, so a plain INSERT of the
-- documented columns (other tools write here too) still reads as a snapshot. Added to the
-- partitioned table, so every partition has it; ensure_options_chains_partition creates new
-- months `like options_chains including defaults including constraints`, so they get it too.
alter table options_chains add column if not exists source text not null default 'snapshot'
check (source in ('snapshot', 'reconstructed'));

-- The metrics ask, per (ticker, snapshot time), whether any row of that snapshot was
-- reconstructed. A partial index answers that with one lookup whatever the chain's size: live
-- snapshots have no entry at all, and ingesting them writes nothing to it.
create index if not exists options_chains_reconstructed_idx
on options_chains (ticker_id, time) where source = 'reconstructed';

-- dlt's staging copy (0002) was created `like options_chains` before this column existed. Same
-- default, so a load that does not send `source` stages 'snapshot'; no check here, as for the
-- other columns: the MERGE into options_chains enforces it.
alter table public_staging.options_chains
add column if not exists source text not null default 'snapshot';
