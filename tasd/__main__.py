"""``python -m tasd``: the ``tasd`` command line."""

import sys

from tasd.cli import main

if __name__ == "__main__":
    sys.exit(main())
