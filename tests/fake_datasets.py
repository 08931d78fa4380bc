"""Small FAKE datasets written in each dataset's official on-disk format, for the loader and CLI tests."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def pixels(n: int, size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Deterministic random uint8 images (n, channels, size, size)."""
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


# ---- fake datasets in the official formats -------------------------------------------------


def write_cifar10(root: Path, per_batch: int = 3, n_test: int = 5) -> dict[str, np.ndarray]:
    """cifar-10-batches-py: 5 train batches + test_batch + batches.meta, pickled dicts.

    The official files were pickled by Python 2; loaded with encoding="latin1" (as
    torchvision does) their keys are str, exactly like the str keys written here.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = {"train": pixels(5 * per_batch, 32, seed=1), "test": pixels(n_test, 32, seed=2)}
    batches = [(f"data_batch_{i + 1}", "train", i * per_batch, per_batch) for i in range(5)]
    for name, split, start, n in [*batches, ("test_batch", "test", 0, n_test)]:
        data = images[split][start : start + n].reshape(n, 3072)
        labels = [(start + j) % 10 for j in range(n)]
        entry = {"batch_label": name, "data": data, "labels": labels, "filenames": [""] * n}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return images


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 12, n_test: int = 4):
    """<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, uncompressed."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    images = {"train": pixels(n_train, 28, 1, seed=3)[:, 0], "t10k": pixels(n_test, 28, 1, 4)[:, 0]}
    for prefix, imgs in images.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", imgs)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(len(imgs)) % 10)
    return images


def write_imagenet(root: Path, size: int = 32, per_file: int = 2, n_val: int = 3):
    """imagenet<S>/train_data_batch_{1..10}.npz + val_data.npz; data channel-major rows.

    One train file is written compressed to exercise the non-memory-mapped path.
    """
    folder = root / f"imagenet{size}"
    folder.mkdir(parents=True)
    files = [(f"train_data_batch_{i}.npz", per_file) for i in range(1, 11)]
    out = {}
    for k, (name, n) in enumerate([*files, ("val_data.npz", n_val)]):
        data = pixels(n, size, seed=10 + k).reshape(n, 3 * size * size)
        labels = (np.arange(n) + k) % 1000 + 1  # official labels are 1-based
        save = np.savez_compressed if name == "train_data_batch_4.npz" else np.savez
        save(folder / name, data=data, labels=labels)
        out[name] = (data, labels)
    return out


def write_imagenet_oord(root: Path, size: int = 32, n_train: int = 4, n_valid: int = 2) -> dict[str, np.ndarray]:
    """imagenet<S>/train_<S>x<S>/*.png and valid_<S>x<S>/*.png (van den Oord's archives, extracted): RGB PNGs.
    Returns the (N, S, S, 3) pixels of each split in file-name order."""
    out = {}
    for split, n, seed in (("train", n_train, 1), ("valid", n_valid, 2)):
        folder = root / f"imagenet{size}" / f"{split}_{size}x{size}"
        folder.mkdir(parents=True, exist_ok=True)
        images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)
        for i, img in enumerate(images):
            Image.fromarray(img, "RGB").save(folder / f"{i:08d}.png")
        out[split] = images
    return out


def write_png(path: Path, size=(20, 20), mode: str = "RGB", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), np.uint8)
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(path)


def write_svhn(root: Path, n_train: int = 10, n_test: int = 3):
    """svhn/{train,test}_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with 10 for digit 0."""
    savemat = pytest.importorskip("scipy.io", reason="SVHN's .mat files need scipy").savemat
    folder = root / "svhn"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x = pixels(n, 32, seed=20).transpose(2, 3, 1, 0)  # (N, C, H, W) -> (H, W, C, N)
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})


def write_celeba(root: Path, partition=(0, 0, 0, 0, 1, 1, 2, 2, 2)):
    """celeba/: img_align_celeba/*.jpg (178x218) and the five annotation files."""
    folder = root / "celeba"
    names = [f"{i + 1:06d}.jpg" for i in range(len(partition))]
    for i, name in enumerate(names):
        arr = np.full((218, 178, 3), 40 + 20 * i, np.uint8)
        (folder / "img_align_celeba").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / "img_align_celeba" / name)

    def table(file: str, header: str | None, row) -> None:
        lines = [str(len(names)), header] if header is not None else []
        lines += [f"{name} {row(i)}" for i, name in enumerate(names)]
        (folder / file).write_text("\n".join(lines) + "\n")

    attrs = " ".join(f"attr{j}" for j in range(40))
    table("list_eval_partition.txt", None, lambda i: partition[i])
    table("identity_CelebA.txt", None, lambda i: 100 + i)
    table("list_attr_celeba.txt", attrs, lambda i: " ".join(["1", "-1"] * 20))
    table("list_bbox_celeba.txt", "image_id x_1 y_1 width height", lambda i: "1 2 3 4")
    table("list_landmarks_align_celeba.txt", "lefteye_x ...", lambda i: " ".join(["5"] * 10))
