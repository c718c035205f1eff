-- option_contracts is written only by ingestion's lifecycle (loaders/ingest/ledger.py), from the
-- rows of options_chains, whose own foreign key already proves each ticker_id; tickers rows are
-- never deleted. Checked again here, row by row, the key cost more than the rest of the
-- lifecycle: 1.3 to 2 s of PostgreSQL per 200,000 new contracts, of 3 to 3.8 s (bench/results.md).
alter table option_contracts drop constraint if exists option_contracts_ticker_id_fkey;
