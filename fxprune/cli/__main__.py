"""``python -m fxprune.cli``: the ``fxprune`` console script."""

import sys

from fxprune.cli.commands import main

sys.exit(main())
