"""flicbridge: Flic button presses to incident platforms, durably."""

__version__ = "0.1.0"
