"""Logging set-up shared by the CLI and the workflow scripts.

Why: the seed's validation lines ("Detected layer prefix: model", ...) are a contract, so
they go through the `abliterate` logger as plain INFO lines with no decoration.
"""

import logging
import sys

logger = logging.getLogger("abliterate")


def setup_logging(level: int = logging.INFO, stream=None) -> None:
    """Send `abliterate` log records to `stream` (stderr by default) as bare messages."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
