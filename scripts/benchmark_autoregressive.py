"""Density and sampling time of coupling, MAF and IAF flows side by side: `python scripts/benchmark_autoregressive.py`.

Options: --dims, --batch, --hidden, --layers, --transform, --repeats, --threads, --device (see --help and
flowgen/cli/benchmark_autoregressive.py; what is measured: flowgen/benchmark/autoregressive.py).
Prints a markdown table with the CPU's name and vector-extension flags.
"""

from flowgen.cli.benchmark_autoregressive import main

if __name__ == "__main__":
    main()
