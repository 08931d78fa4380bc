"""Attribute editing (Glow section 5): the direction math, the groups, and scripts/manipulate.py on a digits run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from torchvision.utils import save_image

from flowgen.attributes import (
    NEGATIVE,
    NEITHER,
    POSITIVE,
    EmptyGroupError,
    class_groups,
    encode,
    manipulate,
    mean_latent_difference,
    shift_latents,
)
from flowgen.build import instantiate_data, restore_run
from flowgen.cli.errors import UserError, run_reporting_errors
from flowgen.cli.manipulate import attribute_groups, edit_attribute
from flowgen.data import ImageDataModule
from flowgen.latents import reconstruct
from flowgen.models import Glow
from tests.conftest import initialize_actnorms, perturb_parameters
from tests.fake_datasets import write_celeba, write_png
from tests.train_runner import REPO, run_entry


def compose_manipulate(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("manipulate", overrides=overrides)


def cli_error(capsys, overrides: list[str]) -> str:
    """manipulate's path in process (compose, then run_reporting_errors); the one error line."""
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(edit_attribute, compose_manipulate(overrides))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


def written(stdout: str) -> list[str]:
    return [line.removeprefix("wrote ").strip() for line in stdout.splitlines() if line.startswith("wrote ")]


@pytest.fixture(scope="module")
def digits(trained_digits):
    """The trained digits run restored, its val images as model inputs, and their labels."""
    run = restore_run(trained_digits.run_dir, use_ema=True)
    data = instantiate_data(run.cfg.data)
    levels = data.images("val", range(20))
    labels = torch.tensor([data.eval_dataset("val")[i][1] for i in range(20)])
    return run, run.module.dequantizer.bin_centres(levels), labels


# ---- the math --------------------------------------------------------------------------------------

def test_class_groups():
    labels = torch.tensor([3, 5, 3, 0, 5, 7])
    assert class_groups(labels, 3).tolist() == [POSITIVE, NEGATIVE, POSITIVE, NEGATIVE, NEGATIVE, NEGATIVE]
    assert class_groups(labels, 3, versus=5).tolist() == [POSITIVE, NEGATIVE, POSITIVE, NEITHER, NEGATIVE, NEITHER]


def test_mean_difference_equals_a_hand_computation(digits):
    run, y, labels = digits
    groups = class_groups(labels, 3, versus=5)
    assert int((groups == POSITIVE).sum()) >= 1 and int((groups == NEGATIVE).sum()) >= 1
    # uneven batches, one of them holding only images of neither group
    batches = [(y[:7], groups[:7]), (y[7:8], groups[7:8]), (y[8:], groups[8:])]
    direction, counts = mean_latent_difference(run.model, batches)
    assert counts == (int((labels == 3).sum()), int((labels == 5).sum()))
    # by hand: every image encoded alone, the two means taken in float64
    latents = [run.model(y[i : i + 1])[0] for i in range(len(y))]
    for level, d in enumerate(direction):
        positive = torch.stack([latents[i][level][0].double() for i in range(len(y)) if labels[i] == 3]).mean(0)
        negative = torch.stack([latents[i][level][0].double() for i in range(len(y)) if labels[i] == 5]).mean(0)
        assert d.shape == latents[0][level].shape[1:] and d.dtype == latents[0][level].dtype
        torch.testing.assert_close(d.double(), positive - negative, atol=1e-5, rtol=1e-5)
    with pytest.raises(EmptyGroupError, match="positive group has no images"):
        mean_latent_difference(run.model, [(y, class_groups(labels, 99))])


def test_alpha_zero_reconstructs_and_alpha_one_moves_by_the_direction(digits):
    run, y, labels = digits
    direction, _ = mean_latent_difference(run.model, [(y, class_groups(labels, 1))])
    zs, _ = run.model(y[:1])
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    edited = shift_latents(zs, direction, alphas)
    for z, z_edit, d in zip(zs, edited, direction, strict=True):
        torch.testing.assert_close(z_edit[2], z[0], atol=0, rtol=0)  # alpha = 0: the latent itself
        torch.testing.assert_close(z_edit[4] - z[0], d, atol=1e-6, rtol=1e-5)  # alpha = 1: moved by exactly d
        torch.testing.assert_close(z_edit[0] - z[0], -d, atol=1e-6, rtol=1e-5)
    strip = manipulate(run.model, y[0], direction, alphas)
    assert strip.shape == (5, *y.shape[1:])
    torch.testing.assert_close(strip[2], reconstruct(run.model, y[:1])[0], atol=1e-6, rtol=0)  # batch of 5 vs 1
    assert float((strip[2] - y[0]).abs().max()) < 1e-4  # decode(encode(x)) = x
    assert float((strip[4] - y[0]).abs().max()) > 1e-3  # and the edit changes the image


def test_class_conditional_model_edits_without_labels():
    """Its forward asks for labels (the prior); the latents do not depend on them, so images without one edit too."""
    torch.manual_seed(0)
    model = Glow(in_channels=1, image_size=4, scales=2, steps=2, hidden_channels=8, num_classes=3).double()
    y = torch.rand(6, 1, 4, 4, dtype=torch.float64) - 0.5
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    perturb_parameters(model)  # then ActNorm's init normalises the perturbed net: a well-conditioned map
    initialize_actnorms(model, y, labels)
    model.eval()
    for z, z_labelled in zip(encode(model, y), model(y, labels)[0], strict=True):
        torch.testing.assert_close(z, z_labelled, atol=0, rtol=0)
    direction, counts = mean_latent_difference(model, [(y, class_groups(labels, 2))])
    assert counts == (2, 4)
    strip = manipulate(model, y[0], direction, [0.0, 1.0])
    torch.testing.assert_close(strip[0], y[0], atol=1e-10, rtol=0)
    zs = encode(model, y[:1])
    for z_moved, z, d in zip(encode(model, strip[1:]), zs, direction, strict=True):
        torch.testing.assert_close(z_moved[0] - z[0], d, atol=1e-10, rtol=0)  # f(decode(z + d)) = z + d


# ---- the groups a dataset offers ---------------------------------------------------------------------

def test_celeba_attribute_groups(tmp_path):
    write_celeba(tmp_path)  # 9 images: train 0-3, val 4-5, test 6-8
    names = [f"attr{j}" for j in range(40)]
    rows = [["1" if (i + j) % 2 else "-1" for j in range(40)] for i in range(9)]
    table = [str(9), " ".join(names) + " "] + [f"{i + 1:06d}.jpg " + " ".join(r) for i, r in enumerate(rows)]
    (tmp_path / "celeba" / "list_attr_celeba.txt").write_text("\n".join(table) + "\n")
    data = ImageDataModule(name="celeba", root=tmp_path, image_size=8, val_size=0)
    data.setup()
    groups = attribute_groups(data, "test", "attr1")
    assert groups.positive == "attr1" and groups.tag == "attr1"
    # test images are files 7, 8, 9 (i = 6, 7, 8): attr1 is 1 where i + 1 is odd
    assert groups.assign(torch.tensor([-1, -1, -1]), torch.tensor([0, 1, 2])).tolist() == [POSITIVE, NEGATIVE,
                                                                                           POSITIVE]
    with pytest.raises(UserError, match=r"attribute='Smiling' is not a celeba attribute; choose one of attr0, "):
        attribute_groups(data, "test", "Smiling")
    with pytest.raises(UserError, match="leave versus unset"):
        attribute_groups(data, "test", "attr1", versus="attr2")


def test_unlabelled_data_is_refused(tmp_path):
    for i in range(6):
        write_png(tmp_path / "photos" / f"{i}.png", size=(8, 8), seed=i)
    data = ImageDataModule(name="folder", path=tmp_path / "photos", image_size=8, val_size=2)
    data.setup()
    with pytest.raises(UserError, match="data=folder has no labels"):
        attribute_groups(data, "val", 0)


# ---- scripts/manipulate.py ---------------------------------------------------------------------------

def test_strip_end_to_end_and_cached_direction(trained_digits, digits, tmp_path, capsys):
    out = tmp_path / "out"
    args = [f"ckpt_path={trained_digits.run_dir}", "attribute=3", "versus=5", "image=2", "num_images=20",
            "batch_size=16", "upscale=2", f"output_dir={out}", "device=cpu"]
    (path,) = edit_attribute(compose_manipulate(args))
    first = capsys.readouterr().out
    assert "direction saved to" in first and "|d| = " in first
    # five 8 px columns with 1 px borders, enlarged twice
    assert path.name == "manipulate_class3-vs-class5_val2_alpha-1_-0.5_0_0.5_1.png"
    assert Image.open(path).size == (2 * (5 * 9 + 1), 2 * (9 + 1))
    (cache,) = (out / "directions").glob("*.pt")
    cached = torch.load(cache, weights_only=True)
    run, y, labels = digits
    direction, counts = mean_latent_difference(run.model, [(y, class_groups(labels, 3, versus=5))])
    assert tuple(cached["counts"]) == counts
    for d_cached, d in zip(cached["direction"], direction, strict=True):
        torch.testing.assert_close(d_cached, d, atol=1e-6, rtol=1e-5)
    # the middle column (alpha = 0) is the image itself
    pixels = np.asarray(Image.open(path).convert("L"))[::2, ::2]
    middle = pixels[1:9, 2 * 9 + 1 : 3 * 9]
    levels = instantiate_data(run.cfg.data).images("val", [2])[0, 0].numpy()
    np.testing.assert_array_equal(np.rint(middle / 255 * 16).astype(int), levels)
    # a rerun, other alphas: the direction comes from the cache
    edit_attribute(compose_manipulate([*args, "alphas=[0,2]"]))
    second = capsys.readouterr().out
    assert f"direction from {cache}" in second
    assert second.split("|d| = ")[1].split()[0] == first.split("|d| = ")[1].split()[0]


@pytest.mark.parametrize("args, message", [
    (["attribute=Smiling"], "data=digits is labelled by class; give a class 0..9"),
    (["attribute=10"], "data=digits is labelled by class; give a class 0..9"),
    (["attribute=3", "versus=3"], "versus=3 must be a class 0..9 other than attribute=3"),
    (["attribute=3", "num_images=2"], "no image of class 3 among the first 2 val images"),
    (["attribute=3", "image=297"], "image=297 is outside the val split (0..296)"),
    (["attribute=3", "image=nowhere.png"], "neither an index in the val split nor an image file"),
    (["attribute=3", "alphas=[]"], "alphas=[] must not be empty"),
    (["image=0"], "attribute is required"),
])
def test_mistakes_end_in_one_line(trained_digits, tmp_path, capsys, args, message):
    assert message in cli_error(capsys, [f"ckpt_path={trained_digits.run_dir}", f"output_dir={tmp_path}", *args])
    assert not list(tmp_path.glob("*.png"))


def test_unreadable_image_file(trained_digits, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    line = cli_error(capsys, [f"ckpt_path={trained_digits.run_dir}", "attribute=3", f"image={tmp_path / 'notes.png'}"])
    assert "notes.png: cannot be read as an image" in line


def test_an_image_file_edits_like_the_split_image(trained_digits, digits, tmp_path):
    """A val image saved as a PNG (levels k -> k / 16 intensities) and passed as image=<file> gives the same strip."""
    run, _, _ = digits
    levels = instantiate_data(run.cfg.data).images("val", [2])[0]
    save_image(levels.float() / 16, tmp_path / "digit.png")
    args = [f"ckpt_path={trained_digits.run_dir}", "attribute=3", "num_images=20", f"output_dir={tmp_path}"]
    (from_index,) = edit_attribute(compose_manipulate([*args, "image=2"]))
    (from_file,) = edit_attribute(compose_manipulate([*args, f"image={tmp_path / 'digit.png'}"]))
    assert from_file.name == "manipulate_class3_digit_alpha-1_-0.5_0_0.5_1.png"
    assert np.array_equal(np.asarray(Image.open(from_file)), np.asarray(Image.open(from_index)))


@pytest.mark.slow  # a subprocess (~10-20 s on 2 busy cores): `make test-full`
def test_entry_point(trained_digits, tmp_path):
    args = [f"ckpt_path={trained_digits.run_dir}", "image=4", "num_images=20", f"output_dir={tmp_path}"]
    # scripts/ is not the package's parent: PYTHONPATH lets it run from an uninstalled checkout too
    run = run_entry("scripts/manipulate.py", [*args, "attribute=3"], tmp_path, env={"PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.output[-3000:]
    assert "|d| = " in run.stdout and written(run.stdout)[0].endswith("manipulate_class3_val4_alpha-1_-0.5_0_0.5_1.png")
    run = run_entry("scripts/manipulate.py", [*args, "attribute=12"], tmp_path, env={"PYTHONPATH": str(REPO)})
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.output
    assert "attribute=12: data=digits is labelled by class" in errors[0]
