-- Ingestion with dlt (kapman ingest). dlt's upsert skips unchanged rows and stamps every row it
-- inserts or changes with its load id, so the rows a load wrote are counted, not guessed.
alter table options_chains add column if not exists _dlt_load_id text;

-- dlt stages an upsert in <dataset>_staging.<table> and MERGEs from there. Created here with the
-- destination's own types (uuid, numeric, char), so COPY parses the csv once into the right types
-- and the MERGE compares like with like (from the Arrow types dlt would make ticker_id text, and
-- text = uuid has no operator). dlt only truncates this table; it never drops it.
create schema if not exists public_staging;
create table if not exists public_staging.options_chains (like options_chains including defaults);
