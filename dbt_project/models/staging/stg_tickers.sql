with

source as (

    select * from {{ source('kapman', 'tickers') }}

),

renamed as (

    select

        ----------  ids
        id as ticker_id,

        ---------- text
        symbol

    from source

)

select * from renamed
