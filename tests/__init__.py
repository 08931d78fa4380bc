"""flowgen's test suite: a regular package, so that ``tests.*`` imports find these modules and never another
distribution's top-level ``tests`` package (torch-fidelity 0.4 installs one into site-packages)."""
