"""Constants of the Polygon (Massive) options-chain source."""

DEFAULT_BASE_URL = "https://api.polygon.io"
SNAPSHOT_PATH = "v3/snapshot/options/{underlying}"
# Every path the snapshot's next_url may take; anything else is refused, never followed.
SNAPSHOT_PATH_PREFIX = "/v3/snapshot/options/"
API_KEY_PARAM = "apiKey"
PAGE_LIMIT = 250  # the endpoint's maximum; later pages carry it in their cursor

# Retries: per request, and a budget per symbol so one sick chain cannot stall the run.
RETRY_STATUS_CODES = (429, 500, 502, 503, 504)
MAX_ATTEMPTS = 5
RETRY_BUDGET_PER_SYMBOL = 12
BACKOFF_FACTOR = 0.5  # seconds: 0.5, 1, 2, 4 ... capped by MAX_RETRY_DELAY
MAX_RETRY_DELAY = 30.0  # also caps a Retry-After header
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0

# A chain known to hold more than this many contracts is fetched as parallel expiration-range
# slices of about this size (its pages are otherwise one request after another).
SLICE_CONTRACTS = 2_500

TABLE_NAME = "options_chains"
ITEM_ROWS = 50_000  # rows per item the resource yields (several symbols' chains together)
PRIMARY_KEY = ("time", "contract_ticker")
