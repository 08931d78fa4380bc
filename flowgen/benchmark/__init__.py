"""Speed and memory measurements behind ``scripts/benchmark.py`` (see README, "Performance")."""
