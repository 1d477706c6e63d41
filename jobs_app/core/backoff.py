"""How long to wait before trying again: one rule for every retry loop (the dispatcher,
the workflow's callback client, the live-update listener)."""

from __future__ import annotations

import random


def full_jitter(base: float, cap: float, tries: int) -> float:
    """AWS's "full jitter": uniform in [0, min(cap, base * 2**tries)] seconds.

    `tries` counts the attempts already failed (0 before the first retry).
    """
    return random.uniform(0, min(cap, base * 2 ** min(tries, 30)))
