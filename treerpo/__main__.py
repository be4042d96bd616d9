"""`python -m treerpo` is the `treerpo` console script."""

import sys

from treerpo.cli import main

sys.exit(main())
