"""Test fixtures that ship with the package: `v4 demo` and the benchmarks build on them too."""
