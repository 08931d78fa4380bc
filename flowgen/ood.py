r"""Out-of-distribution scores from a flow's likelihood: typicality, its batch test, and AUROC.

A low bpd does not mean "in distribution": flows trained on one dataset can give another one a
higher likelihood (Nalisnick et al. 2019, "Do deep generative models know what they don't know?";
a CIFAR-10 Glow prefers SVHN).  In D dimensions nearly all of the model's mass lies in its typical
set, where bpd(x) = -log2 p(x) / D is close to the entropy rate; the mode and its neighbourhood are
dense but almost never drawn.  Typicality (Nalisnick et al. 2019, "Detecting out-of-distribution
inputs to deep generative models using typicality") therefore asks how far an input's bpd lies
from the typical value, on either side:

    typical bpd   H = (1/N) Σ_n bpd(x_n)             x_n: reference images of the model's own data
    typicality    t(x) = |bpd(x) - H|                 in bits per dimension; 0 = perfectly typical
    batch test    t_M = |(1/M) Σ_m bpd(x_m) - H|     over a batch of M images, "atypical" when
                  t_M > ε_M, the (1 - fpr) quantile of t_M over bootstrap batches of M reference
                  images (so a batch of in-distribution images is flagged with probability fpr)

bpd here is the per-image bound evaluate.py reports as ``bpd`` (the ELBO).  H estimates the
entropy rate in bits per dimension; t(x) is the M = 1 case of the batch test, whose power grows
with M because the batch mean concentrates around H for in-distribution data.

Per-image scores travel as CSV (one row per image; see ``write_scores``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowgen.errors import UserError

BOOTSTRAP_RESAMPLES = 10_000  # enough for a 1% quantile to move by well under its own spread
TEXT_COLUMNS = ("file",)  # per-image CSV columns that are not numbers


def typicality(bpd: torch.Tensor, typical_bpd: float) -> torch.Tensor:
    """t(x) = |bpd(x) - H|, elementwise, in bits per dimension."""
    return (bpd.double() - typical_bpd).abs()


def bootstrap_threshold(reference_bpd: torch.Tensor, batch_size: int, fpr: float, seed: int = 0) -> float:
    """ε_M: the (1 - fpr) quantile of |mean of M reference bpds drawn with replacement - H|, H their mean."""
    reference = reference_bpd.double()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(reference), (BOOTSTRAP_RESAMPLES, batch_size), generator=generator)
    distances = typicality(reference[draws].mean(dim=1), reference.mean().item())
    return torch.quantile(distances, 1.0 - fpr).item()


@dataclass
class BatchTest:
    """The typicality test on disjoint batches of M scored images (a random partition, remainder dropped)."""

    batch_size: int
    threshold: float  # ε_M in bits per dimension
    num_batches: int
    flagged: float | None  # the fraction of batches with t_M > ε_M (None: fewer than M images)

    def summary(self) -> dict:
        return dict(self.__dict__)


def batch_test(bpd: torch.Tensor, reference_bpd: torch.Tensor, batch_size: int, fpr: float,
               seed: int = 0) -> BatchTest:
    """Split ``bpd`` (one value per scored image) into batches of ``batch_size`` and test each against the reference."""
    threshold = bootstrap_threshold(reference_bpd, batch_size, fpr, seed)
    num_batches = len(bpd) // batch_size
    if num_batches == 0:
        return BatchTest(batch_size, threshold, 0, None)
    order = torch.randperm(len(bpd), generator=torch.Generator().manual_seed(seed))
    batches = bpd.double()[order[: num_batches * batch_size]].view(num_batches, batch_size)
    flagged = typicality(batches.mean(dim=1), reference_bpd.double().mean().item()) > threshold
    return BatchTest(batch_size, threshold, num_batches, flagged.double().mean().item())


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve for telling ``out_scores`` from ``in_scores``, higher = more out-of-distribution.

    1 separates perfectly, 0.5 is chance, below 0.5 the score ranks the other data as *more* in-distribution.
    """
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)])
    if not np.isfinite(scores).all():
        raise UserError("the scores hold NaN or Inf values; re-evaluate with a checkpoint of finite weights")
    is_out = np.concatenate([np.zeros(len(in_scores)), np.ones(len(out_scores))])
    return float(roc_auc_score(is_out, scores))


# ---- the per-image CSV ------------------------------------------------------------------------------

def write_scores(path: Path, columns: dict[str, torch.Tensor | list[str]]) -> None:
    """One row per image; integer columns as integers, the others with every digit of their float value,
    text columns (``file``) as they are.

    Floats are written by ``repr`` of the double, which reads back to the same number, so the mean of
    a column read back equals the mean of the tensor it came from.
    """
    names = list(columns)
    values = [t.tolist() if isinstance(t, torch.Tensor) else list(t) for t in columns.values()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        writer.writerows(zip(*values, strict=True))


def read_scores(path: str | Path) -> dict[str, np.ndarray]:
    """The numeric columns of a per-image score CSV written by evaluate.py, as float64 arrays
    (the ``file`` column, text, is left out)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such score CSV; write one with `python evaluate.py ... csv=true`")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "bpd" not in rows[0]:
        raise UserError(f"{path} is not a per-image score CSV of evaluate.py (it needs a header with bpd and "
                        "one row per image)")
    try:
        return {name: np.array([float(row[name]) for row in rows]) for name in rows[0] if name not in TEXT_COLUMNS}
    except (TypeError, ValueError):
        raise UserError(f"{path} has a row with a missing or non-numeric value") from None
