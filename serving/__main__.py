"""`python -m serving serve|predict ...`: the serving commands without the core CLI."""

import sys

from .cli import main

sys.exit(main())
