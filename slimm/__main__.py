"""`python -m slimm` is the `slimm` command."""

import sys

from slimm.cli import main

sys.exit(main())
