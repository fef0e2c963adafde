"""Logging set-up shared by the CLI and the workflow scripts.

Why: the seed's validation lines ("Detected layer prefix: model", ...) are a contract, so
they go through the `abliterate` logger as plain INFO lines with no decoration.
"""

import contextlib
import json
import logging
import sys
import traceback

logger = logging.getLogger("abliterate")


def setup_logging(level: int = logging.INFO, stream=None) -> None:
    """Send `abliterate` log records to `stream` (stderr by default) as bare messages."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


@contextlib.contextmanager
def rule_log(snakemake):
    """Run a workflow script's body with logging into the rule's log file.

    Why: Snakemake points the user at the rule's log, so that is where the one sentence of
    an expected error (`AbliterateError`, a bad YAML or JSON file) must be, and the
    console gets that sentence too instead of a Python traceback; the job then exits 1.
    An unexpected error is a bug: its traceback goes to the log and it is raised again.
    """
    import yaml

    from .errors import AbliterateError

    with open(snakemake.log[0], "w") as log:
        setup_logging(stream=log)
        try:
            yield log
        except (AbliterateError, yaml.YAMLError, json.JSONDecodeError) as error:
            message = (
                f"error: {error}"
                if isinstance(error, AbliterateError)
                else (f"error: could not parse a file ({type(error).__name__}: {error})")
            )
            print(message, file=log, flush=True)
            print(f"{snakemake.rule}: {message}", file=sys.stderr, flush=True)
            sys.exit(1)
        except SystemExit:
            raise
        except BaseException:
            traceback.print_exc(file=log)
            log.flush()
            raise
