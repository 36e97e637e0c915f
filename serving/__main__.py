"""`python -m serving serve|predict ...`: the serving commands without the core CLI."""

from .cli import main

# Guarded: the server's JSON worker processes (spawned) import this module again as `__mp_main__`.
if __name__ == "__main__":
    raise SystemExit(main())
