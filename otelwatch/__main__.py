"""`python -m otelwatch`: the same command line as the `otelwatch` script (cli.py)."""

import sys

from otelwatch.cli import main

sys.exit(main())
