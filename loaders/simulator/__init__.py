"""The market simulator: a deterministic option market served as a Polygon-compatible HTTP API."""

from .faults import Fault
from .market import Market, full_market_universe
from .server import SimulatorServer

__all__ = ["Fault", "Market", "SimulatorServer", "full_market_universe"]
