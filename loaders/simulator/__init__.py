"""The market simulator: a deterministic option market served as a Polygon-compatible HTTP API."""

from .market import Market, full_market_universe
from .server import Fault, SimulatorServer

__all__ = ["Fault", "Market", "SimulatorServer", "full_market_universe"]
