"""`python -m xltop`: the same as the `xltop` command."""

import sys

from xltop.entry import main

sys.exit(main())
