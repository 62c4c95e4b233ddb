"""Prefect flows and tasks plus the `hvp` command line: wiring only, the logic lives in stages/ and catalog/."""
