"""``python -m hyperst`` runs the command line."""

import sys

from hyperst.cli import main

sys.exit(main())
