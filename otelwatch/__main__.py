import sys

from otelwatch.cli import main

sys.exit(main())
