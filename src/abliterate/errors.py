"""One exception type for bad input.

Why: the CLI and the workflow scripts print `str(error)` as the whole message, so every
raise site writes one sentence that names the file or key and says what was expected.
"""


class AbliterateError(Exception):
    """A user-facing error: one sentence naming the file/key and what was expected."""
