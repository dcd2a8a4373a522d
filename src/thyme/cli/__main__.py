"""``python -m thyme.cli ...``: the same as ``thyme ...``."""

import sys

from . import main

sys.exit(main())
