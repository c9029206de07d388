"""The op-specific halves of the benchmarks: shapes, inputs, providers and analytic byte / FLOP counts, one module
per op (named as in kernels/ and tests/).

They live in the package so that `layoutgen bench` (layoutgen.bench.ops) runs from an installed package; the
scripts benchmarks/bench_<op>.py are command-line and pytest-benchmark wrappers around the same modules, so each
op's benchmark is still defined in one place.
"""
