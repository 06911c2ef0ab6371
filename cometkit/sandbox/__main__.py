"""``python -m cometkit.sandbox``: the same server as ``cometkit sandbox``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .cli import DESCRIPTION, add_arguments, run


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cometkit.sandbox", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
