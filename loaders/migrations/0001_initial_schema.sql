-- Tables of the interface contract. Other systems share them: every column beyond the documented
-- ones is nullable or defaulted so that their plain INSERTs keep working.

create table if not exists tickers (
    id uuid primary key default gen_random_uuid(),
    symbol text unique not null,
    created_at timestamptz not null default now()
);

create table if not exists watchlists (
    watchlist_id text not null,
    symbol text not null,
    active boolean not null default true,
    source text,
    effective_date date,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    unique (watchlist_id, symbol)
);

-- One row per contract per snapshot. Keyed by the provider's contract ticker: SPX and SPXW share
-- (expiration, strike, type), so that composite is not an identity.
create table if not exists options_chains (
    time timestamptz not null,
    ticker_id uuid not null references tickers (id),
    contract_ticker text not null,
    expiration_date date not null,
    strike_price numeric not null,
    option_type char(1) not null check (option_type in ('C', 'P')),
    implied_volatility double precision,
    delta double precision,
    gamma double precision,
    theta double precision,
    vega double precision,
    open_interest bigint,
    volume bigint,
    bid numeric,
    ask numeric,
    last numeric,
    underlying_price numeric,
    -- provider extras (nullable)
    underlying_symbol text,
    exercise_style text,
    shares_per_contract integer,
    break_even_price numeric,
    fmv numeric,
    quote_updated_at timestamptz,
    trade_at timestamptz,
    day_updated_at timestamptz,
    ingested_at timestamptz not null default now(),
    unique (time, contract_ticker)
) partition by range (time);

-- Catches any month that has no partition of its own yet (plain INSERTs from other tools).
create table if not exists options_chains_default partition of options_chains default;

create index if not exists options_chains_ticker_time_idx on options_chains (ticker_id, time);

-- Creates the month's partition; rows the default partition already holds for that month move in.
create or replace function ensure_options_chains_partition(month date) returns void
language plpgsql as $$
declare
    lo timestamptz := date_trunc('month', month::timestamp) at time zone 'UTC';
    hi timestamptz := (date_trunc('month', month::timestamp) + interval '1 month') at time zone 'UTC';
    part text := format('options_chains_%s', to_char(month, 'YYYY_MM'));
begin
    if to_regclass(part) is not null then
        return;
    end if;
    perform pg_advisory_xact_lock(hashtext('options_chains_partitions'));
    if to_regclass(part) is not null then
        return;
    end if;
    execute format(
        'create table %I (like options_chains including defaults including constraints)', part);
    execute format(
        'with moved as (delete from options_chains_default where time >= %L and time < %L returning *)'
        ' insert into %I select * from moved', lo, hi, part);
    execute format(
        'alter table options_chains attach partition %I for values from (%L) to (%L)', part, lo, hi);
end;
$$;

-- Drops whole months older than the cutoff (opt-in retention; never called by default).
create or replace function drop_options_chains_partitions_before(cutoff date) returns integer
language plpgsql as $$
declare
    rec record;
    dropped integer := 0;
begin
    for rec in
        select c.relname
        from pg_inherits i
        join pg_class c on c.oid = i.inhrelid
        join pg_class p on p.oid = i.inhparent
        where p.relname = 'options_chains' and c.relname ~ '^options_chains_\d{4}_\d{2}$'
          and to_date(substr(c.relname, 16), 'YYYY_MM') + interval '1 month' <= cutoff
    loop
        execute format('drop table %I', rec.relname);
        dropped := dropped + 1;
    end loop;
    return dropped;
end;
$$;

-- Shared with other analytics: this project writes only volatility_metrics_json and its bookkeeping.
create table if not exists daily_snapshots (
    time timestamptz not null,
    ticker_id uuid not null references tickers (id),
    volatility_metrics_json jsonb,
    metrics_model_version text,
    metrics_updated_at timestamptz,
    primary key (time, ticker_id)
);

-- Contract lifecycle: soft deactivation, never deletion.
create table if not exists option_contracts (
    contract_ticker text primary key,
    ticker_id uuid not null references tickers (id),
    expiration_date date not null,
    strike_price numeric not null,
    option_type char(1) not null,
    first_seen_at timestamptz not null,
    last_seen_at timestamptz not null,
    active boolean not null default true,
    deactivated_at timestamptz
);
create index if not exists option_contracts_ticker_idx on option_contracts (ticker_id);

-- The ingestion ledger: what completed per (symbol, snapshot time), so re-runs skip done work.
create table if not exists ingestion_ledger (
    symbol text not null,
    snapshot_time timestamptz not null,
    status text not null check (status in ('running', 'completed', 'failed')),
    pages integer,
    contracts integer,
    rows_written bigint,
    rejected integer,
    error text,
    started_at timestamptz not null default now(),
    finished_at timestamptz,
    primary key (symbol, snapshot_time)
);
