"""The CNF measurements of the README ("Continuous flows"): `python scripts/cnf_benchmark.py tolerance RUN`,
`... sampling RUN`, `... playground`; the work is flowgen/cli/cnf_benchmark.py and flowgen/benchmark/cnf.py."""

import sys

from flowgen.cli.cnf_benchmark import cnf_benchmark
from flowgen.cli.errors import run_reporting_errors

if __name__ == "__main__":
    run_reporting_errors(cnf_benchmark, sys.argv[1:])
