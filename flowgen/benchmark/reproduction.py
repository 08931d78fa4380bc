"""What reproducing a paper experiment costs: training FLOPs per image and GPU-hours at a stated rate.

    FLOPs / image   the benchmark's counter (``measure.count_flops``: matrix products, convolutions and
                    attention, forward + backward) on one training step of the module ``train.py`` builds
                    (``workloads.flowgen_workload``) at batch 1, on the CPU (FLOPs do not depend on the
                    device).  The deep configs are counted at depths 1 and 2 and extrapolated linearly in the
                    number of identical units (Glow's steps per level, TarFlow's blocks), which is exact: every
                    unit of a level does the same arithmetic (tests/test_device_check.py checks it)
    GPU-hours       FLOPs / image x training images / epoch x epochs / (utilisation x peak) / 3600
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from flowgen.benchmark.measure import count_flops
from flowgen.benchmark.workloads import flowgen_workload
from flowgen.data.registry import dataset
from flowgen.data.splits import held_out_count
from flowgen.errors import UserError

# NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s dense bf16 tensor-core peak (1,979 is the 2:4-sparsity figure)
H100_BF16_DENSE_FLOPS = 989.4e12
UTILISATION = 0.4

# per data set: the images of its training split (the data sets' own documentation), and how many sets of
# data.val_size images flowgen holds out of it (data=folder, without val/ and test/ directories: val and test)
# data=folder: the image set an experiment names (the dataset registry knows every other training split)
FOLDER_IMAGES = {"glow_celebahq256": 30_000}  # CelebA-HQ: 30,000 images

# the config key of each family's repeated identical unit, when it has one
DEPTH_KEYS = {"Glow": "model.steps", "TarFlow": "model.num_blocks"}


def _with(cfg: DictConfig, **values) -> DictConfig:
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in values.items()]))


def step_flops_per_image(cfg: DictConfig) -> int:
    """Counted FLOPs of one training step at batch 1 on the CPU, float32, not compiled."""
    cfg = _with(cfg, **{"data.batch_size": 1, "trainer.precision": "32-true", "performance.compile": "none"})
    workload = flowgen_workload(cfg, torch.device("cpu"))
    return count_flops(workload.train_step)


def depth_key(cfg: DictConfig) -> str | None:
    return DEPTH_KEYS.get(str(cfg.model._target_).rsplit(".", 1)[-1])


def training_flops_per_image(cfg: DictConfig, extrapolate: bool = True) -> tuple[int, str]:
    """FLOPs of one training image and how they were counted.  With ``extrapolate`` and a family that
    repeats identical units: F(n) = F(1) + (n - 1)(F(2) - F(1)) from counts at depths 1 and 2."""
    key = depth_key(cfg)
    if not extrapolate or key is None:
        return step_flops_per_image(cfg), "counted at batch 1"
    depth = int(OmegaConf.select(cfg, key))
    one, two = (step_flops_per_image(_with(cfg, **{key: n})) for n in (1, 2))
    return one + (depth - 1) * (two - one), f"counted at batch 1, {key}=1 and 2, linear in {key}={depth}"


def training_images_per_epoch(cfg: DictConfig, folder_images: int | None = None) -> int:
    """The training split (the dataset registry's; ``folder_images`` for data=folder) less the images held out."""
    record = dataset(str(cfg.data.name))
    total, held_out_sets = record.train_images or folder_images, record.held_out_splits
    if total is None:
        raise UserError(f"data={record.name}: how many images the folder holds is not known; give folder_images")
    held = held_out_count(cfg.data.val_size, total) if held_out_sets and cfg.data.get("val_size") else 0
    return total - held_out_sets * held


def gpu_hours(flops_per_image: float, images_per_epoch: int, epochs: int, utilisation: float = UTILISATION,
              peak_flops: float = H100_BF16_DENSE_FLOPS) -> float:
    return flops_per_image * images_per_epoch * epochs / (utilisation * peak_flops) / 3600


# The papers' numbers for each experiment config (test-set bpd; FID where the paper gives one for this model)
PUBLISHED = {
    "glow_cifar10": "3.35 (Kingma & Dhariwal 2018, Table 2); no FID",
    "glow_celeba64": "none: not a setting of the Glow paper (RealNVP's CelebA 64x64 3.02, Dinh et al. 2017 "
                     "Table 1, is 8-bit and another model)",
    "glow_celebahq256": "none in the Glow paper's tables (CelebA-HQ 256 5-bit: samples and manipulation); no FID",
    "realnvp_cifar10": "3.49 (Dinh et al. 2017, Table 1); no FID",
    "tarflow_cifar10": "none: the TarFlow paper has no CIFAR-10 model",
    "tarflow_imagenet64": "2.99 (Zhai et al. 2025, Table 2, unconditional, uniform dequantization); its FIDs "
                          "are of the noise-augmented models, not this config",
}


def reproduction_row(experiment: str, cfg: DictConfig) -> dict:
    """FLOPs per training image, images per epoch, epochs and GPU-hours of one experiment config."""
    flops, how = training_flops_per_image(cfg)
    images, epochs = training_images_per_epoch(cfg, FOLDER_IMAGES.get(experiment)), int(cfg.trainer.max_epochs)
    return {"experiment": experiment, "published": PUBLISHED.get(experiment, "-"), "flops_per_image": flops,
            "flops_counted": how, "images_per_epoch": images, "epochs": epochs,
            "gpu_hours": gpu_hours(flops, images, epochs)}


def markdown_rows(rows: list[dict]) -> str:
    head = (f"| config | paper bpd (FID) | training GFLOP / image | images / epoch x epochs | training FLOPs "
            f"| H100-hours at {UTILISATION:.0%} of bf16 dense peak |")
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        total = r["flops_per_image"] * r["images_per_epoch"] * r["epochs"]
        lines.append(f"| `experiment={r['experiment']}` | {r['published']} | {r['flops_per_image'] / 1e9:,.1f} "
                     f"| {r['images_per_epoch']:,} x {r['epochs']:,} | {total:.2e} | {r['gpu_hours']:.3g} |")
    return "\n".join(lines)
