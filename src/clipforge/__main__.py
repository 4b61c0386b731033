"""`python -m clipforge ...` runs the `clipforge` command."""

import sys

from clipforge.cli import main

sys.exit(main())
