"""`python -m llmos_edge` is the `llmos` command."""

import sys

from llmos_edge.cli import main

sys.exit(main())
