with

source as (

    select * from {{ source('kapman', 'watchlists') }}

),

renamed as (

    select

        ----------  ids
        watchlist_id,
        symbol,

        ---------- flags
        active as is_active,

        ---------- dates
        effective_date,
        updated_at

    from source

)

select * from renamed
