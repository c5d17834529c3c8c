"""``python -m m3vit``: the command-line interface."""

import sys

from .cli import main

sys.exit(main())
