"""Benchmarks: iampg side by side with the alternatives, on the emulator (``nox -s bench``)."""
