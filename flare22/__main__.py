"""``python -m flare22 ...``: the development command (see flare22/cli.py)."""
import sys

from .cli import main

sys.exit(main())
