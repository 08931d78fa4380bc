"""flowgen.data on small FAKE datasets written in each dataset's official on-disk format.

The real loaders (torchvision's classes, our npz / folder / digits readers) read them, so a
format mistake fails here and not three hours into a cluster job. Nothing touches the
network: an autouse fixture makes every socket connection fail.

Tests of: flowgen/data/datamodule.py, flowgen/data/digits.py, flowgen/data/folder.py, flowgen/data/imagenet_oord.py,
flowgen/data/splits.py, flowgen/data/torchvision_sets.py, flowgen/data/transforms.py.
"""

from __future__ import annotations

import inspect
import pickle
import socket
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from flowgen.data import DATASETS, DatasetNotFoundError, ImageDataModule, num_levels
from flowgen.data.errors import DatasetCorruptError
from flowgen.data.imagenet_chrabaszcz import open_npz_array
from flowgen.data.quantize import Quantize
from flowgen.errors import InvalidValueError
from tests.fake_datasets import (
    pixels,
    write_celeba,
    write_cifar10,
    write_imagenet,
    write_imagenet_oord,
    write_mnist,
    write_png,
    write_svhn,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "data"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails at once, as on an offline cluster node."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def make(name: str, root: Path, **kwargs) -> ImageDataModule:
    """A data module with test-friendly defaults (no workers, no download, small batches)."""
    defaults = dict(root=root, batch_size=4, num_workers=0, download=False, val_size=2)
    return ImageDataModule(name=name, **{**defaults, **kwargs})


# ---- quantization ----------------------------------------------------------------------


def test_quantize_keeps_the_top_bits():
    x = torch.tensor([0, 7, 8, 200, 255], dtype=torch.uint8)
    assert Quantize(32)(x).tolist() == [0, 0, 1, 25, 31]
    assert Quantize(256)(x).tolist() == x.tolist()
    assert Quantize(None)(x).tolist() == x.tolist()  # digits: already levels
    every = torch.arange(256, dtype=torch.uint8)
    for n_bits in range(1, 9):  # floor(p K / 256) is the top n_bits bits for K = 2**n_bits
        assert torch.equal(Quantize(2**n_bits)(every), every >> (8 - n_bits))


# ---- CIFAR-10 ---------------------------------------------------------------------------


def test_cifar10_items_are_levels_of_the_original_pixels(tmp_path):
    images = write_cifar10(tmp_path)
    dm = make("cifar10", tmp_path, n_bits=5)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_levels == 32 and dm.input_shape == (3, 32, 32) and dm.num_classes == 10
    x, y = dm.train_set[0]
    original = int(dm.train_set.source.indices[0])  # index into the 15 official train images
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert torch.equal(x, torch.from_numpy(images["train"][original]) >> 3)
    assert y == original % 10
    x, y = dm.test_set[4]
    assert torch.equal(x, torch.from_numpy(images["test"][4]) >> 3) and y == 4
    assert max(int(dm.train_set[i][0].max()) for i in range(len(dm.train_set))) <= 31


def test_val_is_held_out_of_train_with_a_fixed_seed(tmp_path):
    write_cifar10(tmp_path)

    def split(seed: int, val_size) -> tuple[list[int], list[int]]:
        dm = make("cifar10", tmp_path, val_size=val_size, split_seed=seed)
        dm.setup()
        return dm.train_set.source.indices.tolist(), dm.val_set.source.indices.tolist()

    train, val = split(0, 4)
    assert len(val) == 4 and len(train) == 11
    assert sorted(train + val) == list(range(15))  # a partition of the official train set
    assert split(0, 4) == (train, val)  # same seed, same split
    assert split(1, 4) != (train, val)
    assert len(split(0, 0.2)[1]) == 3  # a float is a fraction of train


def test_dataloaders_follow_the_batch_contract(tmp_path):
    write_cifar10(tmp_path, per_batch=3, n_test=5)
    dm = make("cifar10", tmp_path, batch_size=4, eval_batch_size=2, val_size=3)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 12 // 4 and all(x.shape == (4, 3, 32, 32) for x, _ in batches)
    x, y = batches[0]
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    # Evaluation sees every image exactly once, in order, the last batch possibly short.
    test = list(dm.test_dataloader())
    assert [len(y) for _, y, _ in test] == [2, 2, 1]
    assert torch.cat([y for _, y, _ in test]).tolist() == [0, 1, 2, 3, 4]
    assert torch.cat([i for _, _, i in test]).tolist() == [0, 1, 2, 3, 4]  # dataset indices travel along
    assert sum(len(y) for _, y, _ in dm.val_dataloader()) == 3


def test_train_loader_keeps_a_split_smaller_than_one_batch(tmp_path):
    write_cifar10(tmp_path)
    dm = make("cifar10", tmp_path, batch_size=64, max_items=5)
    dm.setup()
    assert [len(y) for _, y in dm.train_dataloader()] == [5]


def test_hflip_applies_to_train_only(tmp_path):
    images = write_cifar10(tmp_path)
    dm = make("cifar10", tmp_path, hflip=True)
    dm.setup()
    original = torch.from_numpy(images["train"][int(dm.train_set.source.indices[0])])
    assert torch.equal(dm.train_set[(0, False)][0], original)
    assert torch.equal(dm.train_set[(0, True)][0], original.flip(-1))
    assert torch.equal(dm.train_set[0][0], original)  # a plain index is never flipped
    val_original = torch.from_numpy(images["train"][int(dm.val_set.source.indices[0])])
    assert torch.equal(dm.val_set[(0, True)][0], val_original)  # val and test: hflip is off
    assert torch.equal(dm.test_set[0][0], torch.from_numpy(images["test"][0]))


def test_flips_are_drawn_per_epoch_and_image_from_the_seed(tmp_path):
    write_cifar10(tmp_path, per_batch=20)
    dm = make("cifar10", tmp_path, hflip=True, val_size=10, batch_size=10)
    dm.setup()
    sampler = dm.train_dataloader().sampler
    keys = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        keys[epoch] = list(sampler)
        sampler.set_epoch(epoch)
        assert list(sampler) == keys[epoch]  # the same epoch, the same order and flips
    flips = [flip for _, flip in keys[0]]
    assert 0 < sum(flips) < len(flips)
    assert keys[0] != keys[1]


def test_max_items_truncates_every_split(tmp_path):
    write_cifar10(tmp_path)
    dm = make("cifar10", tmp_path, max_items=3, val_size=4)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (3, 3, 3)
    with pytest.raises(IndexError):
        dm.train_set[3]


def test_present_files_are_never_downloaded_nor_md5_checked(tmp_path, monkeypatch):
    write_cifar10(tmp_path)  # fake files: torchvision's MD5 check would reject every one

    def fail(*args, **kwargs):
        raise AssertionError("tried the network although the files are present")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    dm = make("cifar10", tmp_path, download=True)
    dm.prepare_data()
    dm.setup()
    assert len(dm.test_set) == 5


def test_corrupt_cifar_batch_is_named(tmp_path):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"not a pickle at all")
    dm = make("cifar10", tmp_path)
    with pytest.raises(DatasetCorruptError, match="data_batch_3") as info:
        dm.setup()
    assert "\n" not in str(info.value)


# ---- MNIST / Fashion-MNIST --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_mnist_idx_files_are_padded_to_32(tmp_path, name, folder):
    images = write_mnist(tmp_path, folder)
    dm = make(name, tmp_path, channels=1, image_size=32, val_size=2)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (10, 2, 4)
    x, y = dm.test_set[3]
    assert x.shape == (1, 32, 32) and x.dtype == torch.uint8 and y == 3
    assert torch.equal(x[0, 2:30, 2:30], torch.from_numpy(images["t10k"][3]))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert x[0][border].eq(0).all()


def test_mnist_other_sizes_and_channels_are_resized_and_converted(tmp_path):
    images = write_mnist(tmp_path)
    dm = make("mnist", tmp_path, channels=1, image_size=28)
    dm.setup()
    assert torch.equal(dm.test_set[0][0][0], torch.from_numpy(images["t10k"][0]))
    dm = make("mnist", tmp_path, channels=3, image_size=16, n_bits=4)
    dm.setup()
    x, _ = dm.train_set[0]
    assert x.shape == (3, 16, 16) and int(x.max()) <= 15
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_corrupt_idx_file_is_named(tmp_path):
    write_mnist(tmp_path)
    bad = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DatasetCorruptError, match="t10k-images-idx3-ubyte"):
        make("mnist", tmp_path, channels=1).setup()


# ---- SVHN and CelebA --------------------------------------------------------------------


def test_svhn_mat_files(tmp_path):
    write_svhn(tmp_path)
    dm = make("svhn", tmp_path, val_size=1)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 1, 3)
    x, y = dm.test_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, torch.from_numpy(pixels(3, 32, seed=20)[0]))
    assert [dm.test_set[i][1] for i in range(3)] == [1, 2, 3]
    assert dm.train_set.source.source[9][1] == 0  # the .mat file's label 10 is digit 0


def test_celeba_official_splits_cropped_and_resized(tmp_path):
    write_celeba(tmp_path)
    dm = make("celeba", tmp_path, image_size=64, hflip=True, val_size=0)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4, 2, 3)
    x, y = dm.val_set[1]
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8 and y == -1
    assert abs(int(x.float().mean()) - (40 + 20 * 5)) <= 2  # JPEG: nearly the written value
    assert dm.num_classes is None


# ---- downsampled ImageNet: van den Oord et al. 2016 (the papers' tables) ------------------


def test_imagenet_oord_pngs(tmp_path):
    """data=imagenet32: train_32x32/*.png and valid_32x32/*.png; the official valid set is the test split."""
    written = write_imagenet_oord(tmp_path, size=32, n_train=12, n_valid=3)
    dm = make("imagenet32", tmp_path, val_size=2)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (10, 2, 3)
    assert dm.num_classes is None and dm.num_levels == 256
    x, y = dm.test_set[1]
    assert y == -1 and torch.equal(x, torch.from_numpy(written["valid"][1]).permute(2, 0, 1))


def test_imagenet_oord_64_at_fewer_bits_and_a_smaller_size(tmp_path):
    written = write_imagenet_oord(tmp_path, size=64, n_train=3, n_valid=2)
    dm = make("imagenet64", tmp_path, image_size=64, n_bits=5, val_size=1)
    dm.setup()
    x, _ = dm.test_set[0]
    assert torch.equal(x, torch.from_numpy(written["valid"][0]).permute(2, 0, 1) >> 3)
    small = make("imagenet64", tmp_path, image_size=32, val_size=1)
    small.setup()
    assert small.test_set[0][0].shape == (3, 32, 32)


def test_imagenet_oord_reads_the_official_archives_as_they_are(tmp_path):
    """train_32x32.tar and valid_32x32.tar, not extracted: the same images as the extracted directories; a
    worker gets the split without the parent's open archive (it reopens it)."""
    written = write_imagenet_oord(tmp_path / "extracted", size=32, n_train=5, n_valid=3)
    folder = tmp_path / "archives" / "imagenet32"
    folder.mkdir(parents=True)
    for split in ("train", "valid"):
        with tarfile.open(folder / f"{split}_32x32.tar", "w") as tar:
            tar.add(tmp_path / "extracted" / "imagenet32" / f"{split}_32x32", arcname=f"{split}_32x32")
    dm = make("imagenet32", tmp_path / "archives", val_size=1)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4, 1, 3)
    assert torch.equal(dm.test_set[2][0], torch.from_numpy(written["valid"][2]).permute(2, 0, 1))
    x, _, _ = next(iter(dm.test_dataloader()))
    assert torch.equal(x, torch.from_numpy(written["valid"]).permute(0, 3, 1, 2))
    raw = dm.test_set.source
    assert raw._tar is not None and pickle.loads(pickle.dumps(raw))._tar is None


def test_imagenet_oord_image_of_the_wrong_size_is_named(tmp_path):
    write_imagenet_oord(tmp_path, size=32, n_train=3, n_valid=2)
    write_png(tmp_path / "imagenet32" / "valid_32x32" / "00000001.png", (64, 64), "RGB")
    dm = make("imagenet32", tmp_path, val_size=1)
    dm.setup()
    with pytest.raises(DatasetCorruptError, match=r"00000001.png.*RGB 32x32") as info:
        dm.test_set[1]
    assert "\n" not in str(info.value)


def test_imagenet_oord_and_chrabaszcz_files_live_side_by_side(tmp_path):
    """Each release is read from its own files in <root>/imagenet32, and a missing one names its own archives."""
    write_imagenet(tmp_path, size=32)
    with pytest.raises(DatasetNotFoundError, match=r"train_32x32.tar and valid_32x32.tar .*van den Oord"):
        make("imagenet32", tmp_path).prepare_data()
    write_imagenet_oord(tmp_path, size=32, n_train=4, n_valid=2)
    oord, chrabaszcz = make("imagenet32", tmp_path, val_size=1), make("imagenet32_chrabaszcz", tmp_path, val_size=1)
    for dm in (oord, chrabaszcz):
        dm.setup()
    assert (len(oord.test_set), len(chrabaszcz.test_set)) == (2, 3)
    assert (oord.num_classes, chrabaszcz.num_classes) == (None, 1000)


# ---- downsampled ImageNet: Chrabaszcz et al. 2017 (npz release) ---------------------------


def test_imagenet_npz_batches(tmp_path):
    files = write_imagenet(tmp_path, size=32)
    dm = make("imagenet32_chrabaszcz", tmp_path, n_bits=8, val_size=5)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 3)
    assert dm.num_classes == 1000
    data, labels = files["val_data.npz"]
    x, y = dm.test_set[2]
    assert x.shape == (3, 32, 32) and y == labels[2] - 1  # 0-based
    # channel-major rows: all R (row-major), then all G, then all B
    assert int(x[1, 3, 5]) == data[2, 1 * 1024 + 3 * 32 + 5]
    # item 7 of train = file 4 (the compressed one), row 1
    raw = dm.train_set.source.source
    x, y = raw[7]
    assert torch.equal(x.reshape(-1), torch.from_numpy(files["train_data_batch_4.npz"][0][1]))


def test_npz_arrays_are_memory_mapped_when_stored(tmp_path):
    files = write_imagenet(tmp_path, size=32)
    stored = open_npz_array(tmp_path / "imagenet32" / "train_data_batch_1.npz", "data")
    packed = open_npz_array(tmp_path / "imagenet32" / "train_data_batch_4.npz", "data")
    assert isinstance(stored, np.memmap) and not isinstance(packed, np.memmap)
    assert np.array_equal(stored, files["train_data_batch_1.npz"][0])
    assert np.array_equal(packed, files["train_data_batch_4.npz"][0])


def test_imagenet_workers_reopen_the_maps_instead_of_copying_them(tmp_path):
    write_imagenet(tmp_path, size=32)
    dm = make("imagenet32_chrabaszcz", tmp_path)
    dm.setup()
    raw = dm.test_set.source
    raw[0]  # opens the maps in this process
    assert raw._pixels is not None and pickle.loads(pickle.dumps(raw))._pixels is None


def test_imagenet64_and_downsizing(tmp_path):
    write_imagenet(tmp_path, size=64, per_file=1, n_val=2)
    dm = make("imagenet64_chrabaszcz", tmp_path, image_size=32, n_bits=3, val_size=1)
    dm.setup()
    x, _ = dm.train_set[0]
    assert x.shape == (3, 32, 32) and int(x.max()) <= 7


def test_imagenet_wrong_shape_is_named(tmp_path):
    write_imagenet(tmp_path, size=32)
    np.savez(
        tmp_path / "imagenet32" / "val_data.npz", data=np.zeros((3, 10), np.uint8), labels=[1, 2, 3]
    )
    with pytest.raises(DatasetCorruptError, match="val_data.npz"):
        make("imagenet32_chrabaszcz", tmp_path).setup()


# ---- folder -----------------------------------------------------------------------------


def test_folder_of_mixed_images_is_converted(tmp_path):
    write_png(tmp_path / "a.png", (40, 30), "RGB", 1)
    write_png(tmp_path / "b.png", (20, 20), "L", 2)
    write_png(tmp_path / "c.png", (20, 20), "RGBA", 3)
    write_png(tmp_path / "nested" / "deeper" / "d.png", (17, 23), "RGB", 4)  # odd size
    for i in range(6):
        write_png(tmp_path / f"more{i}.jpg", (24, 24), "RGB", 10 + i)
    (tmp_path / "notes.txt").write_text("not an image")
    dm = make("folder", tmp_path, path=tmp_path, image_size=16, val_size=2)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 2, 2)
    assert dm.num_classes is None
    for split in (dm.train_set, dm.val_set, dm.test_set):
        for i in range(len(split)):
            x, y = split[i]
            assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == -1
    gray = make("folder", tmp_path, path=tmp_path, image_size=8, channels=1, n_bits=2)
    gray.setup()
    x, _ = gray.train_set[0]
    assert x.shape == (1, 8, 8) and int(x.max()) <= 3


def test_folder_same_size_image_keeps_its_pixels(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"{i}.png", (16, 16), "RGB", i)
    dm = make("folder", tmp_path, path=tmp_path, image_size=16, val_size=0)
    dm.setup()
    expected = torch.from_numpy(np.array(Image.open(tmp_path / "0.png"))).permute(2, 0, 1)
    assert torch.equal(dm.train_set[0][0], expected)


def test_folder_class_subdirectories_give_labels(tmp_path):
    for cls in ("cat", "dog", "emu"):
        for i in range(3):
            write_png(tmp_path / cls / f"{i}.png", seed=i)
    dm = make("folder", tmp_path, path=tmp_path, image_size=8, val_size=1)
    dm.setup()
    assert dm.num_classes == 3
    labels = [dm.train_set[i][1] for i in range(len(dm.train_set))]
    labels += [dm.val_set[0][1], dm.test_set[0][1]]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_folder_train_val_test_subdirectories_are_the_splits(tmp_path):
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        for cls in ("a", "b"):
            for i in range(n):
                write_png(tmp_path / split / cls / f"{i}.png", seed=i)
    dm = make("folder", tmp_path, path=tmp_path, image_size=8, val_size=0.5)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (10, 4, 6)
    assert [dm.test_set[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]


def test_folder_file_names_follow_each_split_in_order(tmp_path):
    """The file of item i of every split (held-out and given splits) is the file item i was read from."""
    for i in range(7):
        write_png(tmp_path / "train" / f"{i}.png", (8, 8), "RGB", i)
    for i in range(2):
        write_png(tmp_path / "test" / f"t{i}.png", (8, 8), "RGB", 100 + i)
    dm = make("folder", tmp_path, path=tmp_path, image_size=8, val_size=2, max_items=4)
    dm.setup()
    for split in ("train", "val", "test"):
        files = dm.file_names(split)
        dataset = dm.eval_dataset(split)
        assert len(files) == len(dataset) == {"train": 4, "val": 2, "test": 2}[split]  # max_items cuts train
        for i, file in enumerate(files):
            expected = torch.from_numpy(np.array(Image.open(file))).permute(2, 0, 1)
            assert torch.equal(dataset[i][0], expected), (split, i, file)
    assert set(dm.file_names("val")).isdisjoint(dm.file_names("train"))  # held out of train/
    assert dm.file_names("test") == [str(tmp_path / "test" / "t0.png"), str(tmp_path / "test" / "t1.png")]
    digits = make("digits", tmp_path, val_size=297, n_bits=None, image_size=8, channels=1)
    digits.setup()
    assert digits.file_names("test") is None


def test_folder_without_labels_in_split_dirs(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        for i in range(n):
            write_png(tmp_path / split / f"{i}.png", seed=i)
    dm = make("folder", tmp_path, path=tmp_path, image_size=8, val_size=1)
    dm.setup()  # no val/: held out of train
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (3, 1, 2)
    assert dm.train_set[0][1] == -1


def test_empty_folder_names_directory_and_extensions(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="png") as info:
        make("folder", tmp_path, path=tmp_path / "empty").setup()
    assert str(tmp_path / "empty") in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="not a directory"):
        make("folder", tmp_path, path=tmp_path / "nowhere").setup()


def test_corrupt_png_is_named_when_read(tmp_path):
    write_png(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    dm = make("folder", tmp_path, path=tmp_path, image_size=8, val_size=0)
    dm.setup()  # listing is lazy: the error comes with the read
    with pytest.raises(DatasetCorruptError, match="broken.png") as info:
        [dm.train_set[i] for i in range(len(dm.train_set))]
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# ---- digits -----------------------------------------------------------------------------


def test_digits_has_17_levels_and_test_equals_val():
    dm = ImageDataModule(name="digits", image_size=8, channels=1, n_bits=None, val_size=297)
    dm.setup()
    assert dm.num_levels == 17 and dm.input_shape == (1, 8, 8) and dm.num_classes == 10
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1500, 297, 297)
    assert dm.test_set.source is dm.val_set.source
    x, y = dm.train_set[0]
    assert x.dtype == torch.uint8 and x.shape == (1, 8, 8) and 0 <= y <= 9
    xs = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert int(xs.max()) == 16 and int(xs.min()) == 0


# ---- missing files and downloads --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "folder", "kwargs"),
    [
        ("cifar10", "cifar-10-batches-py", {}),
        ("mnist", "MNIST/raw", {"channels": 1}),
        ("fashion_mnist", "FashionMNIST/raw", {"channels": 1}),
        ("svhn", "svhn", {}),
        ("celeba", "celeba", {"image_size": 64}),
        ("imagenet32", "imagenet32", {}),
        ("imagenet64", "imagenet64", {"image_size": 64}),
        ("imagenet32_chrabaszcz", "imagenet32", {}),
        ("imagenet64_chrabaszcz", "imagenet64", {"image_size": 64}),
    ],
)
def test_missing_files_name_the_directory(tmp_path, name, folder, kwargs):
    dm = make(name, tmp_path, **kwargs)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as info:
            step()
        message = str(info.value)
        assert str(tmp_path / folder) in message and name in message and "\n" not in message
        assert "data.root" in message
        assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize(("name", "kwargs"), [("cifar10", {}), ("mnist", {"channels": 1})])
def test_failed_download_becomes_dataset_not_found(tmp_path, monkeypatch, name, kwargs):
    calls = []

    def offline(request, *args, **kwargs):
        calls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dm = make(name, tmp_path, download=True, **kwargs)
    with pytest.raises(DatasetNotFoundError, match="download failed") as info:
        dm.prepare_data()
    assert calls, "the download was never attempted"
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


# ---- argument validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cifar100"}, "choose one of cifar10, mnist"),
        ({"n_bits": 0}, "n_bits=0"),
        ({"n_bits": 9}, "n_bits=9"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"channels": 2}, "channels=2"),
        ({"name": "folder"}, "data.path"),
        ({"num_levels": 17}, "num_levels=17"),
        ({"val_size": 1.5}, "val_size=1.5"),
        ({"name": "digits", "n_bits": 8}, "n_bits=null"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        ImageDataModule(**{"name": "cifar10", **kwargs})
    assert "\n" not in str(info.value)


def test_val_size_larger_than_train_is_refused(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(ValueError, match="val_size=15"):
        make("cifar10", tmp_path, val_size=15).setup()


# ---- configs ----------------------------------------------------------------------------


def load_config(name: str, data_dir: Path, path: Path) -> object:
    """configs/data/<name>.yaml on the shared configs/base/data.yaml, under a minimal parent config that
    defines paths.data_dir (composing with the schema through Hydra is tested in test_configs)."""
    cfg = OmegaConf.create({"paths": {"data_dir": str(data_dir)}})
    own = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    assert list(own.pop("defaults")) == ["data_schema", "/base/data@_here_", "_self_"]
    cfg.data = OmegaConf.merge(OmegaConf.load(CONFIG_DIR.parent / "base" / "data.yaml"), own)
    if name == "folder":
        cfg.data.path = str(path)
    return cfg.data


def test_there_is_one_config_per_dataset():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(DATASETS)


@pytest.mark.parametrize("name", DATASETS)
def test_every_config_sets_every_argument_and_instantiates(tmp_path, name):
    cfg = load_config(name, tmp_path, tmp_path)
    arguments = set(inspect.signature(ImageDataModule.__init__).parameters) - {"self"}
    assert set(cfg.keys()) - {"_target_"} == arguments
    assert OmegaConf.to_container(cfg, resolve=True)["root"] == str(tmp_path)
    dm = instantiate(cfg)
    assert isinstance(dm, ImageDataModule) and dm.name == name
    assert dm.input_shape[0] == cfg.channels and dm.input_shape[1] == cfg.image_size


def test_digits_config_gives_batches_without_any_files(tmp_path):
    dm = instantiate(load_config("digits", tmp_path, tmp_path), max_items=100)
    dm.prepare_data()
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.uint8 and int(x.max()) < dm.num_levels
    assert y.dtype == torch.int64


# ---- the training order: seeded, and resumable inside an epoch --------------------------------------

def _digits(batch_size=100):
    data = make("digits", Path("unused"), batch_size=batch_size, val_size=297, n_bits=None, num_levels=17,
                image_size=8, channels=1)
    data.setup()
    return data


def _labels_in_order(loader):
    return torch.cat([y for _, y in loader])


def test_training_order_follows_the_seed_and_the_epoch():
    data = _digits()
    first = data.train_dataloader()
    first.sampler.set_epoch(0)
    order = _labels_in_order(first)
    again = data.train_dataloader()
    again.sampler.set_epoch(0)
    assert torch.equal(order, _labels_in_order(again))
    again.sampler.set_epoch(1)
    assert not torch.equal(order, _labels_in_order(again))
    data.shuffle_seed = 7
    other = data.train_dataloader()
    other.sampler.set_epoch(0)
    assert not torch.equal(order, _labels_in_order(other))


def test_resume_continues_the_epoch_where_it_stopped():
    data = _digits()
    straight = data.train_dataloader()
    straight.sampler.set_epoch(3)
    order = _labels_in_order(straight)
    data.load_state_dict({"epoch": 3, "batches_done": 4, "batch_size": 100, "world_size": 1, "shuffle_seed": 0})
    resumed = data.train_dataloader()
    assert torch.equal(_labels_in_order(resumed), order[400:])
    assert torch.equal(_labels_in_order(resumed), order)  # and the next pass is a whole epoch again


def test_resume_with_another_batch_size_or_device_count_warns_and_restarts_the_epoch():
    data = _digits()
    data.load_state_dict({"epoch": 2, "batches_done": 4, "batch_size": 100, "world_size": 2, "shuffle_seed": 0})
    with pytest.warns(UserWarning, match=r"100 x 1 devices .* instead of 100 x 2 .* epoch 2 restarts"):
        loader = data.train_dataloader()
    assert loader.sampler.epoch == 2 and len(_labels_in_order(loader)) == 1500


@pytest.mark.parametrize("world_size, n", [(2, 297), (3, 10), (4, 3)])
def test_evaluation_shards_cover_every_image_once_without_padding(world_size, n):
    from flowgen.data.sampler import EvaluationShardSampler

    shards = [list(EvaluationShardSampler(list(range(n)), num_replicas=world_size, rank=r)) for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(EvaluationShardSampler(list(range(n)), world_size, r)) for r in range(world_size)] == \
        [len(s) for s in shards]


@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, True, None])
def test_n_bits_must_be_an_int_in_1_to_8(bad):
    with pytest.raises(InvalidValueError, match=r"data.n_bits=.* must be an int in 1..8"):
        num_levels("cifar10", bad)


def test_k_is_the_datasets_own_count_or_two_to_the_bits():
    """The one rule for K: digits store 17 levels (n_bits must then be null); 8-bit sources keep 2**n_bits."""
    assert [num_levels("cifar10", n) for n in range(1, 9)] == [2**n for n in range(1, 9)]
    assert num_levels("digits", None) == 17
    with pytest.raises(InvalidValueError, match="digits has its own 17 levels"):
        num_levels("digits", 8)
    with pytest.raises(InvalidValueError, match="is not a dataset"):
        num_levels("cifar100", 8)


def test_photo_crops_make_a_folder_dataset_without_overlap(tmp_path, capsys):
    """flowgen/cli/photo_crops.py: 640 crops of scikit-learn's two photographs, split into train/val/test."""
    from flowgen.cli.photo_crops import run

    run([str(tmp_path)])
    names = {split: sorted(p.name for p in (tmp_path / split).glob("*.png")) for split in ("train", "val", "test")}
    assert sum(map(len, names.values())) == 640 and len(names["test"]) == len(names["val"]) == 64
    assert not set(names["train"]) & set(names["val"]) and not set(names["train"]) & set(names["test"])
    dm = make("folder", tmp_path, path=str(tmp_path), image_size=32)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (512, 64, 64)
    with pytest.raises(SystemExit, match="usage"):
        run([])
