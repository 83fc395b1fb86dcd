"""One token bucket, for every rate the bridge keeps: a sink's pace and an ingest source's.

``rate`` tokens a second, at most ``burst`` saved up; full at the first use. Over any
window of T seconds at most rate × T + burst are taken.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float = 0.0
    updated: float | None = None  # when it was last filled; None: never used

    def take(self, now: float) -> float:
        """Take a token if one is there (return 0) or say how many seconds until one is."""
        if self.updated is None:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def shift(self, delta: float) -> None:
        """The clock it is read on moved by ``delta`` (a wall-clock step absorbed)."""
        if self.updated is not None:
            self.updated += delta
