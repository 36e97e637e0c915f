"""Seeds: stable seeds derived from any parts, and seeded initialisation that is safe when several parties
build their modules in one process at once."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_LOCK = threading.RLock()


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts: every random draw is a function of (seed, site, round),
    so a resumed run draws exactly what an uninterrupted one would."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's global generator as if it had just been seeded with `seed`, leaving it as it was
    afterwards. Module constructors draw from that one global generator: without the lock, two threads (the
    pipeline's workers of one process, say) would interleave their draws and build different weights."""
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
