"""Speed and memory measurements behind ``scripts/benchmark.py`` (see README, "Performance").

Owns: the measurements (FLOPs, GEMM rate, convolution ceiling, peak memory, saved activations), the
workloads, the side-by-side table, the autoregressive cost table, the device check's steps and the reproduction
table. May import: every library layer and ``flowgen.build``; never ``flowgen.cli``. Imported only by its
commands in ``flowgen.cli``.
"""
