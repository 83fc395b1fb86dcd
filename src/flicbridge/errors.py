"""The one exception tree: every error flicbridge raises on purpose is a FlicbridgeError.

A leaf module (it imports nothing of flicbridge), so any layer can raise these.
"""

from __future__ import annotations


class FlicbridgeError(Exception):
    """Base of every error flicbridge raises on purpose."""


class UnknownButton(FlicbridgeError, LookupError):
    """A signal named a button the configuration does not have."""


class NotAccepting(FlicbridgeError, RuntimeError):
    """The bridge is shutting down and takes no new signals."""


class TokenSpent(FlicbridgeError):
    """An exec token was used already."""


class TokenExpired(FlicbridgeError):
    """An exec token outlived its lifetime (or was never issued)."""


class TokenInUse(FlicbridgeError):
    """Another request is committing this token's action right now."""


class StoreError(FlicbridgeError):
    """The store cannot be used (corrupt, unreadable, wrong file) or cannot commit."""


class TooManySubscriptions(FlicbridgeError):
    """The bridge keeps a bounded number of subscriptions (``MAX_SUBSCRIPTIONS``)."""
