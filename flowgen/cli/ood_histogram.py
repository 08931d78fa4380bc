"""``python scripts/ood_histogram.py in_csv=<CSV> ood_csv=[<CSV>,...]``: how well a flow's scores tell data apart.

Reads per-image score CSVs that evaluate.py wrote for one model (the in-distribution set, then one or
more others), draws their per-image bpd, and their typicality when every CSV has it, as overlaid
histograms on log-spaced bins in one PNG, and prints the AUROC of each score for telling each other set from
the in-distribution one (flowgen.ood.auroc: 0.5 = chance; bpd below 0.5 = the other data looks *more*
likely to the model, the failure typicality is meant to catch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig
from rich.console import Console
from rich.table import Table

from flowgen.checks import validated
from flowgen.cli.errors import UserError
from flowgen.ood import auroc, read_scores

SCORES = {"bpd": "bpd (ELBO), bits / dim", "typicality": "typicality |bpd - H|, bits / dim"}


def ood_histogram(cfg: DictConfig) -> dict:
    """Write the figure, print the AUROC table; returns {other set: {score: AUROC}}."""
    cfg = validated(cfg)  # types and ranges: flowgen/config/tool_schemas.py OodHistogramConfig
    if not cfg.get("in_csv"):
        raise UserError("in_csv is required: the CSV evaluate.py wrote for the in-distribution data")
    others = cfg.get("ood_csv")
    others = list(others) if isinstance(others, ListConfig | list) else [others] if others else []
    if not others:
        raise UserError("ood_csv is required: one CSV of evaluate.py, or a list ood_csv=[a.csv,b.csv]")
    if cfg.get("output") and Path(cfg.output).expanduser().is_dir():
        raise UserError(f"output={cfg.output} is a directory; give the path of the PNG file to write")
    sets = {_name(path): read_scores(path) for path in [cfg.in_csv, *others]}
    if len(sets) != 1 + len(others):
        raise UserError("two of the CSVs have the same name; give each set its own file name")
    scores = [s for s in SCORES if all(s in columns for columns in sets.values())]

    (in_name, in_set), *other_sets = sets.items()
    aurocs = {name: {s: auroc(in_set[s], columns[s]) for s in scores} for name, columns in other_sets}
    output = Path(cfg.output) if cfg.get("output") else Path(cfg.in_csv).with_suffix(".ood.png")
    _figure(sets, scores, aurocs, cfg.bins, output)
    _print_table(in_name, aurocs, scores, {name: len(columns["bpd"]) for name, columns in sets.items()})
    print(f"wrote {output}", flush=True)
    return aurocs


def _name(path) -> str:
    """last.eval-svhn-test.csv -> svhn-test (the data and split evaluate.py put in the name)."""
    return Path(str(path)).stem.split(".eval-")[-1]


def _figure(sets: dict, scores: list[str], aurocs: dict, bins: int, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(5.5 * len(scores), 4), squeeze=False)
    (in_name, _), *_ = sets.items()
    for ax, score in zip(axes[0], scores, strict=True):
        # log-spaced bins: other data can lie tens of bits/dim away from the in-distribution spread of a few tenths.
        # Both scores are >= 0 but a log axis starts above 0: at most the lowest 1% of each set share the first bin.
        low = max(min(float(np.quantile(columns[score], 0.01)) for columns in sets.values()), 1e-3)
        high = max(float(columns[score].max()) for columns in sets.values())
        edges = np.geomspace(low, max(high, 1.01 * low), bins + 1)
        for name, columns in sets.items():
            clipped = np.clip(columns[score], low, None)
            fraction = np.full(len(clipped), 1 / len(clipped))  # per bin, not per unit: bins differ in width
            if name == in_name:  # the reference as an outline, so the filled others never hide it
                ax.hist(clipped, bins=edges, weights=fraction, histtype="step", color="black", linewidth=1.5,
                        label=name)
            else:
                ax.hist(clipped, bins=edges, weights=fraction, alpha=0.45,
                        label=f"{name} (AUROC {aurocs[name][score]:.3f})")
        ax.set_xscale("log")
        ax.set_xlabel(SCORES[score])
        ax.set_ylabel("fraction of the set's images")
        ax.legend(fontsize="small")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def _print_table(in_name: str, aurocs: dict, scores: list[str], sizes: dict) -> None:
    table = Table(title=f"AUROC against {in_name} ({sizes[in_name]} images); 0.5 = chance")
    table.add_column("other set")
    table.add_column("images", justify="right")
    for score in scores:
        table.add_column(f"AUROC {score}", justify="right")
    for name, values in aurocs.items():
        table.add_row(name, str(sizes[name]), *(f"{values[s]:.4f}" for s in scores))
    Console().print(table)
