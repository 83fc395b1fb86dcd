"""flicbridge benchmarks: numbers measured here, each beside a baseline from the same run.

``python -m benchmarks [latency|burst|idle|growth|all] [--quick]`` prints a table and the
same numbers as JSON. They run in the tests' world: ``tests.daemon`` (a real daemon
process, its notify socket, /proc readings) and ``tests.receiver`` (the loopback platform
stand-in), so run them from the repository root.
"""
