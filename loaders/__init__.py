"""kapman-options: Polygon option-chain snapshots into PostgreSQL (dlt) and volatility metrics (dbt)."""

__version__ = "0.1.0"
