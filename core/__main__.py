"""``python -m core``: PETLab's command line, `core.cli`."""

import sys

from core.cli import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
