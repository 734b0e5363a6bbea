"""``python -m halokit`` (and ``accelerate launch -m halokit ...``) runs the CLI."""

import sys

from halokit.cli import main

sys.exit(main())
