"""Named, deterministic seeds: every random draw derives from the run seed and its names.

``derive_seed(seed, "sample", round)`` gives the same number in every process and every run, so a
draw depends on *what* it is for (round, client, purpose), never on the order things happen in.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["derive_seed", "numpy_rng", "torch_generator", "python_random_seeded"]


def derive_seed(base: int, *names: object) -> int:
    """Return a 63-bit seed from ``base`` and any names (strings, ints), stable across processes.

    Uses BLAKE2b of the names' ``repr`` (Python's ``hash`` is salted per process, so it is unfit).
    """
    text = "\x1f".join([str(int(base)), *(repr(n) for n in names)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def numpy_rng(base: int, *names: object) -> np.random.Generator:
    """A NumPy generator seeded by ``derive_seed(base, *names)``."""
    return np.random.default_rng(derive_seed(base, *names))


def torch_generator(base: int, *names: object) -> torch.Generator:
    """A CPU torch generator seeded by ``derive_seed(base, *names)``."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(base, *names))
    return gen


@contextlib.contextmanager
def python_random_seeded(seed: int) -> Iterator[None]:
    """Seed Python's global ``random`` inside the block and restore its state afterwards.

    Flower's strategies sample clients with ``random.sample``; wrapping ``configure_train`` in
    this makes that sampling a function of the seed we pass (e.g. of (run seed, round)).
    """
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)
