"""`python -m service` is `notifier`."""

import sys

from service.cli import main

# Guarded: worker processes (spawn) import the main module again, as __mp_main__.
if __name__ == "__main__":
    sys.exit(main())
