"""Constants of the Polygon (Massive) options-chain source (what can be configured is in configuration.py)."""

DEFAULT_BASE_URL = "https://api.polygon.io"
SNAPSHOT_PATH = "v3/snapshot/options/{underlying}"
# Every path the snapshot's next_url may take; anything else is refused, never followed.
SNAPSHOT_PATH_PREFIX = "/v3/snapshot/options/"
API_KEY_PARAM = "apiKey"
PAGE_LIMIT = 250  # the endpoint's maximum; later pages carry it in their cursor
MAX_PAGES = 20_000  # of one chain: beyond it the pagination is taken for a loop

RETRY_STATUS_CODES = (429, 500, 502, 503, 504)
CONNECT_TIMEOUT = 10.0

TABLE_NAME = "options_chains"
ITEM_ROWS = 50_000  # rows per item the resource yields (several symbols' chains together)
PRIMARY_KEY = ("time", "contract_ticker")
