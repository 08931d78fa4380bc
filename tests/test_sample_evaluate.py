"""sample.py and evaluate.py as subprocesses on checkpoints trained for a few steps (tests/conftest.py).

Tests of: flowgen/checkpoints/run_dir.py.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from flowgen.build import restore_run
from flowgen.cli.errors import run_reporting_errors
from flowgen.cli.evaluate import evaluate
from flowgen.cli.sample import sample
from flowgen.evaluation import image_generators
from flowgen.likelihood import bits_per_dim, dequantize
from tests.fake_datasets import write_cifar10, write_png
from tests.train_runner import FAST, REPO, run_dir, run_entry


def written(run) -> list[str]:
    return [line.removeprefix("wrote ").strip() for line in run.stdout.splitlines() if line.startswith("wrote ")]


def error_line(run) -> str:
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode == 2 and len(errors) == 1, run.output[-3000:]
    assert "Traceback" not in run.output
    return errors[0]


def cli_error(capsys, entry: str, overrides: list[str]) -> str:
    """sample.py / evaluate.py's path in process (compose, then run_reporting_errors); the one error line."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(entry, overrides=overrides)
    function = {"sample": sample, "evaluate": evaluate}[entry]
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(function, cfg)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


def best_checkpoint(run_directory):
    (best,) = [p for p in (run_directory / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    return best


# ---- sample.py ------------------------------------------------------------------------------------

def test_sample_grid_has_one_row_per_temperature(trained_digits, tmp_path):
    run = run_entry("sample.py", [f"ckpt_path={trained_digits.run_dir}", "temperatures=[0,0.5,1.0]", "n=4",
                                  "upscale=2", f"output_dir={tmp_path / 'out'}", "save_individual=true"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    grid, folder = written(run)
    assert "T0-0.5-1" in grid
    # make_grid: n images of 8 px with 1 px borders, then enlarged twice
    assert Image.open(grid).size == (2 * (4 * 9 + 1), 2 * (3 * 9 + 1))
    assert len(list((tmp_path / "out" / folder.split("/")[-1]).glob("T*.png"))) == 12
    assert "ema weights" in run.stdout


def sample_in_process(overrides: list[str]) -> list[str]:
    """sample.py's path in process (a process costs ~8 s of imports): the paths it wrote."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("sample", overrides=overrides)
    return [str(path) for path in sample(cfg)]


def test_samples_are_reproducible_with_the_seed(trained_digits, tmp_path):
    def draw(seed, out):
        paths = sample_in_process([f"ckpt_path={trained_digits.run_dir}", f"seed={seed}", "temperatures=[0.8]",
                                   f"output_dir={tmp_path / out}", "use_ema=false"])
        return Image.open(paths[0]).tobytes()

    first = draw(3, "a")
    assert first == draw(3, "b")
    assert first != draw(4, "c")


def test_interpolation_and_reconstruction_strips(trained_digits, tmp_path):
    run = run_entry("sample.py", [f"ckpt_path={trained_digits.run_dir}", "mode=interpolate", "indices=[2,5]",
                                  "steps=6", f"output_dir={tmp_path}"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert Image.open(written(run)[0]).size == (6 * 9 + 1, 9 + 1)
    run = run_entry("sample.py", [f"ckpt_path={trained_digits.run_dir}", "mode=reconstruct", "num_images=5",
                                  f"output_dir={tmp_path}"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert Image.open(written(run)[0]).size == (5 * 9 + 1, 2 * 9 + 1)
    error = float(run.stdout.split("max|decode(encode(y)) - y| = ")[1].split()[0])
    assert error < 1e-4


def test_class_conditional_rows_per_class(trained_conditional, tmp_path):
    paths = sample_in_process([f"ckpt_path={trained_conditional.run_dir}", "label=all", "n=3", "temperatures=[0.7]",
                               f"output_dir={tmp_path}"])
    assert len(paths) == 10 and all(f"_class{c}.png" in p for c, p in enumerate(paths))
    paths = sample_in_process([f"ckpt_path={trained_conditional.run_dir}", "label=7", f"output_dir={tmp_path}"])
    assert paths[0].endswith("_class7.png")


@pytest.mark.parametrize("args, message", [
    (["temperatures=[0.5,-0.1]"], "temperatures=[0.5, -0.1] has an element that must be >= 0"),
    (["label=3"], "not class-conditional"),
    (["mode=interpolate", "indices=[0,100000]"], "outside the val split"),
])
def test_sample_mistakes_end_in_one_line(trained_digits, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert message in cli_error(capsys, "sample", [f"ckpt_path={trained_digits.run_dir}", f"output_dir={out}",
                                                   *args])
    assert not out.exists()  # the directory made for the outputs goes again when nothing was written


def test_label_outside_the_classes(trained_conditional, capsys):
    line = cli_error(capsys, "sample", [f"ckpt_path={trained_conditional.run_dir}", "label=10"])
    assert "outside the model's classes 0..9" in line


def test_checkpoint_mistakes_end_in_one_line(trained_digits, tmp_path, capsys):
    assert "ckpt_path is required" in cli_error(capsys, "sample", [])
    missing = cli_error(capsys, "evaluate", [f"ckpt_path={tmp_path / 'nope.ckpt'}"])
    assert "no such checkpoint file or run directory" in missing
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    assert "holds no checkpoint" in cli_error(capsys, "sample", [f"ckpt_path={empty}"])
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes((trained_digits.run_dir / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    assert "cannot be read" in cli_error(capsys, "evaluate", [f"ckpt_path={corrupt}"])
    # a checkpoint that lost its run: no config inside it and no config.yaml beside it
    checkpoint = torch.load(trained_digits.run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=False)
    del checkpoint["hyper_parameters"]["run_config"]
    orphan = tmp_path / "orphan" / "model.ckpt"
    orphan.parent.mkdir()
    torch.save(checkpoint, orphan)
    assert "no config.yaml was found" in cli_error(capsys, "sample", [f"ckpt_path={orphan}"])


def test_one_subprocess_error_line(tmp_path):
    """The real entry point prints the same single line (the in-process tests above share its code)."""
    run = run_entry("sample.py", [f"ckpt_path={tmp_path / 'nope'}"], tmp_path)
    assert "no such checkpoint file or run directory" in error_line(run)


# ---- evaluate.py ----------------------------------------------------------------------------------

def test_evaluate_reproduces_the_training_test_bpd(trained_digits, tmp_path):
    """On the run directory, evaluate.py scores the best checkpoint by val/bpd, the one train.py tested."""
    best = best_checkpoint(trained_digits.run_dir)
    run = run_entry("evaluate.py", [f"ckpt_path={trained_digits.run_dir}", "split=test"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert f"checkpoint: {best} (best by val/bpd" in run.stdout
    result = json.loads(best.with_name(f"{best.stem}.eval-digits-test.json").read_text())
    tested = []
    for path in trained_digits.run_dir.glob("csv/version_*/metrics.csv"):
        with open(path) as f:
            tested += [float(row["test/bpd"]) for row in csv.DictReader(f) if row.get("test/bpd")]
    assert len(tested) == 1
    assert result["num_images"] == 297 and result["weights"] == "ema"
    assert result["bpd"] == pytest.approx(tested[0], rel=1e-6)
    assert result["recon_error"] < 1e-4 and result["images_per_sec"] > 0
    assert "bpd (ELBO)" in run.stdout


def test_evaluate_equals_a_direct_computation(trained_digits, tmp_path):
    """bpd = -(log p(y) - D log K) / (D ln 2) averaged over the split, from the model's log_prob by hand."""
    run = run_entry("evaluate.py", [f"ckpt_path={trained_digits.run_dir}", "split=val", "use_ema=false",
                                    "seed=5", "batch_size=50", f"output={tmp_path / 'score.json'}"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    result = json.loads((tmp_path / "score.json").read_text())

    restored = restore_run(trained_digits.run_dir, use_ema=False)
    from flowgen.data import ImageDataModule

    data = ImageDataModule(name="digits", num_levels=17, image_size=8, channels=1, n_bits=None, batch_size=64,
                           eval_batch_size=50, num_workers=0, val_size=297, split_seed=0)
    data.setup()
    bpds = []
    with torch.no_grad():
        for x, _, index in data.val_dataloader():
            u = torch.stack([torch.rand(x.shape[1:], generator=g) for g in image_generators("cpu", 5, index)])
            y = dequantize(x, u, 17)
            log_px = restored.module.model.log_prob(y) - 64 * math.log(17)
            bpds.append(bits_per_dim(log_px, 64))
    direct = torch.cat(bpds).double().mean().item()
    assert result["bpd"] == pytest.approx(direct, abs=1e-5)
    assert result["num_images"] == 297 and result["weights"] == "raw"


def test_evaluate_variational_reports_elbo_and_importance_weighted(trained_conditional, tmp_path):
    run = run_entry("evaluate.py", [f"ckpt_path={trained_conditional.run_dir}", "split=val", "num_samples=4",
                                    f"output={tmp_path / 'score.json'}"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    result = json.loads((tmp_path / "score.json").read_text())
    assert result["dequantization"] == "variational" and result["num_samples"] == 4
    assert result["bpd_iw"] <= result["bpd"]
    assert "importance-weighted, K=4" in run.stdout


@pytest.mark.slow  # three subprocesses (~30 s): `make test-full`
def test_evaluate_on_other_data_and_a_shape_mismatch(tmp_path):
    """Out-of-distribution use: a CIFAR-10 model scored on a folder of PNGs; digits are refused by shape."""
    write_cifar10(tmp_path / "data", per_batch=8, n_test=8)
    train = run_entry("train.py", ["data=cifar10", "model.hidden_channels=8", "model.steps=2", "data.batch_size=4",
                                   "data.val_size=8", "logger=csv", "run_name=cifar", "test=false", *FAST,
                                   "trainer.max_steps=2"], tmp_path)
    assert train.returncode == 0, train.output[-3000:]
    for i in range(5):
        write_png(tmp_path / "photos" / "test" / f"{i}.png", size=(40, 36), seed=i)
        write_png(tmp_path / "photos" / "train" / f"{i}.png", size=(40, 36), seed=10 + i)
        write_png(tmp_path / "photos" / "val" / f"{i}.png", size=(40, 36), seed=20 + i)
    ckpt = run_dir(tmp_path, "cifar")
    run = run_entry("evaluate.py", [f"ckpt_path={ckpt}", "data=folder", f"data.path={tmp_path / 'photos'}",
                                    "data.image_size=32", "data.num_workers=0"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    (scores,) = (ckpt / "checkpoints").glob("*.eval-folder-test.json")  # beside the checkpoint used (which=best)
    result = json.loads(scores.read_text())
    assert result["data"] == "folder" and result["num_images"] == 5 and math.isfinite(result["bpd"])
    mismatch = run_entry("evaluate.py", [f"ckpt_path={ckpt}", "data=digits"], tmp_path)
    assert "shape (1, 8, 8)" in error_line(mismatch)


def test_readme_figures_from_a_trained_run(trained_digits, tmp_path, capsys):
    """flowgen/cli/readme_figures.py: the README's sample and interpolation figures from a run directory."""
    from flowgen.cli.readme_figures import main

    main(["--ckpt-path", str(trained_digits.run_dir), "--per-row", "4", "--upscale", "1", "--out", str(tmp_path)])
    samples, paths = Image.open(tmp_path / "digits_samples.png"), Image.open(tmp_path / "digits_interpolation.png")
    # one row per temperature (5) and per interpolated pair (3), 4 images a row in both
    assert samples.width == paths.width and samples.height > paths.height
    assert "wrote" in capsys.readouterr().out
