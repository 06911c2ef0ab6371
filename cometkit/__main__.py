"""``python -m cometkit``: the same as the ``cometkit`` command."""

import sys

from .cli import main

sys.exit(main())
