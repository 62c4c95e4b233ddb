"""Prefect flows and tasks plus the `hvp` command line: wiring only, the logic lives in stages/ and catalog/."""

import os

# The embedded temporary server must not try to phone home: these machines (and many clusters) have no internet.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
