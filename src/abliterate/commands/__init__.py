"""CLI commands; see `abliterate.cli`."""
