"""flicbridge benchmarks: numbers measured here, each beside a baseline from the same run.

``python -m benchmarks [latency|burst|idle|growth|all] [--quick]`` prints a table and the
same numbers as JSON. ``harness`` (a real daemon process, a notify socket, /proc
readings) is shared with the crash and fault tests; the loopback receiver is the tests'
own (``tests.receiver``), so run them from the repository root.
"""
