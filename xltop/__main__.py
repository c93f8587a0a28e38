"""`python -m xltop`: the same as the `xltop` command."""

import sys

from xltop.cli import main

sys.exit(main())
