with

source as (

    select * from {{ source('kapman', 'daily_snapshots') }}

),

renamed as (

    select

        ----------  ids
        ticker_id,

        ---------- payload
        volatility_metrics_json,
        metrics_model_version,

        ---------- timestamps
        time as snapshot_at,
        metrics_updated_at

    from source

)

select * from renamed
