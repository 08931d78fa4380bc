"""The README's reproduction table: training FLOPs per image (the benchmark's counter, on the CPU) and the
GPU-hours of each paper experiment at a stated utilisation.

    python scripts/reproduction_table.py                     # every experiment config with a paper entry
    python scripts/reproduction_table.py glow_cifar10

Counting and arithmetic: flowgen/benchmark/reproduction.py.
"""

from flowgen.cli.reproduction_table import main

if __name__ == "__main__":
    main()
