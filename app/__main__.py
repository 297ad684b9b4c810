"""``python -m app predict ...``: the appliance's entry point (see app/cli.py)."""
import sys

from .cli import main

sys.exit(main())
