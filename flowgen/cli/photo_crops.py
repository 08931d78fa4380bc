"""``python scripts/photo_crops.py <dir>``: write a folder of real photographs for ``data=folder``: 32x32 crops
of the two photographs that scikit-learn ships (china.jpg, flower.jpg; ``sklearn.datasets.load_sample_images``),
so a comparison on real photos runs on a machine without internet.

    python scripts/photo_crops.py /tmp/photos
    python train.py data=folder data.path=/tmp/photos data.image_size=32 ...

Non-overlapping crops on a 32-pixel grid, from each photo at full size (427x640: 13x20 crops) and
at half size (6x10 crops): 640 images.  Every 10th crop (in raster order) goes to test/, every 10th
shifted by 5 to val/, the rest to train/, so no held-out crop overlaps a training crop (neighbours
are correlated, as patches of one scene are).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

CROP = 32


def crops(photo: np.ndarray) -> list[np.ndarray]:
    rows, cols = photo.shape[0] // CROP, photo.shape[1] // CROP
    return [photo[r * CROP:(r + 1) * CROP, c * CROP:(c + 1) * CROP] for r in range(rows) for c in range(cols)]


def main(out: Path) -> None:
    photos = load_sample_images()
    for split in ("train", "val", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
    count = 0
    for name, photo in zip(photos.filenames, photos.images, strict=True):
        stem = Path(name).stem
        half = np.asarray(Image.fromarray(photo).resize((photo.shape[1] // 2, photo.shape[0] // 2), Image.LANCZOS))
        for scale, image in (("full", photo), ("half", half)):
            for i, crop in enumerate(crops(image)):
                split = "test" if i % 10 == 0 else "val" if i % 10 == 5 else "train"
                Image.fromarray(crop).save(out / split / f"{stem}_{scale}_{i:03d}.png")
                count += 1
    print(f"wrote {count} crops of {CROP}x{CROP} under {out}/(train|val|test)")


def run(argv: list[str]) -> None:
    """The command line: one argument, the output directory."""
    if len(argv) != 1:
        raise SystemExit("usage: python scripts/photo_crops.py <output directory>")
    main(Path(argv[0]))
