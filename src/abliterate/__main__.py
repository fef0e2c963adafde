"""`python -m abliterate ...` is the `abliterate` command (what the workflow's shell rules run)."""

import sys

from abliterate.cli import main

sys.exit(main())
