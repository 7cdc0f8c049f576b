"""`python -m aptserve` runs the `aptserve` command."""

import sys

from aptserve.cli import main

sys.exit(main())
