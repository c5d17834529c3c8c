"""``python -m m3vit.cli``: the command-line interface (as ``python -m m3vit``)."""

import sys

from . import main

sys.exit(main())
