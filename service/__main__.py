"""`python -m service` is `notifier`."""

import sys

from service.cli import main

sys.exit(main())
