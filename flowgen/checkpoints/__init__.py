"""Checkpoint files: writing them whole (``writing``), reading them safely (``reading``), telling what a file that
cannot be used actually is (``diagnosis``), and where a run keeps them plus the one rule for finding one
(``run_dir``).

May import: torch, Lightning's checkpoint I/O, ``flowgen.errors``, ``flowgen.config``. Imported by ``flowgen.build``,
``flowgen.training`` (the atomic writer) and ``flowgen.cli``.
"""
