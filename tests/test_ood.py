"""Out-of-distribution scoring: evaluate.py's per-image CSV, typicality (flowgen.ood) and scripts/ood_histogram.py.

Tests of: flowgen/cli/typical_set.py.
"""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

from flowgen.build import instantiate_data, restore_run
from flowgen.cli.errors import run_reporting_errors
from flowgen.cli.evaluate import evaluate
from flowgen.cli.ood_histogram import ood_histogram
from flowgen.cli.train import train
from flowgen.evaluation import evaluate_split
from flowgen.ood import auroc, batch_test, bootstrap_threshold, read_scores, typicality, write_scores
from tests.fake_datasets import write_png
from tests.test_configs import compose_train
from tests.train_runner import REPO, run_entry

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only contend on 2 shared cores


def composed(config_name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def error_line(capsys, config_name: str, function, overrides: list[str]) -> str:
    """The entry point's path in process (compose, then run_reporting_errors): exit 2 and ONE error line."""
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(function, composed(config_name, overrides))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


# ---- evaluate.py's per-image CSV ----------------------------------------------------------------------

def test_csv_has_one_row_per_image_and_its_bpd_is_evaluates(trained_digits, tmp_path, capsys):
    overrides = [f"ckpt_path={trained_digits.run_dir}", "split=val", "seed=3", "batch_size=50",
                 f"output={tmp_path / 'val.json'}", "typicality.max_images=200", "typicality.batch_sizes=[1,10]"]
    result = evaluate(composed("evaluate", overrides))
    assert "typical set computed" in capsys.readouterr().out
    with open(tmp_path / "val.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert result["csv"] == str(tmp_path / "val.csv") and len(rows) == result["num_images"] == 297
    assert list(rows[0]) == ["index", "label", "bpd", "typicality"]  # uniform noise, one draw: no bpd_iw column
    assert [int(r["index"]) for r in rows] == list(range(297))
    # the mean of the CSV's values is evaluate.py's bpd, to the last bit (the same float64 mean of the same values)
    bpd = torch.tensor([float(r["bpd"]) for r in rows], dtype=torch.float64)
    assert bpd.mean().item() == result["bpd"]

    # each row is the exact per-image value of the evaluation (same split, seed and batches), and its label
    run = restore_run(trained_digits.run_dir, use_ema=True)
    data_cfg = OmegaConf.create(OmegaConf.to_container(run.cfg.data, resolve=True))
    data_cfg.eval_batch_size = 50
    datamodule = instantiate_data(data_cfg)
    direct = evaluate_split(run.model, run.module.dequantizer, datamodule.eval_dataloader("val"), seed=3)
    assert torch.equal(bpd.float(), direct.per_image_bpd)
    assert [int(r["label"]) for r in rows] == direct.labels.tolist()

    # typicality = |bpd - H|, H the mean bpd of 200 validation images (a seeded subset)
    summary = result["typicality"]
    assert summary["split"] == "val" and summary["num_images"] == 200
    expected = (bpd - summary["typical_bpd"]).abs()
    assert torch.tensor([float(r["typicality"]) for r in rows], dtype=torch.float64).tolist() == expected.tolist()
    assert summary["mean_typicality"] == pytest.approx(expected.mean().item(), rel=1e-12)
    assert [(t["batch_size"], t["num_batches"]) for t in summary["batch_tests"]] == [(1, 297), (10, 29)]
    # in-distribution images: the per-image test (fpr 1%) flags few of them
    assert 0 <= summary["batch_tests"][0]["flagged"] < 0.1

    # a second call reads H from the cache beside the checkpoint; another seed recomputes it
    again = evaluate(composed("evaluate", [*overrides, "csv=false", f"output={tmp_path / 'again.json'}"]))
    assert "typical set read from" in capsys.readouterr().out
    assert again["typicality"]["typical_bpd"] == summary["typical_bpd"] and "csv" not in again
    assert not (tmp_path / "again.csv").exists()
    evaluate(composed("evaluate", [*overrides, "seed=4", "typicality.split=null", f"csv={tmp_path / 'x.csv'}"]))
    with open(tmp_path / "x.csv", newline="") as f:
        assert next(csv.reader(f)) == ["index", "label", "bpd"]


def test_variational_csv_has_the_importance_weighted_column(trained_conditional, tmp_path):
    result = evaluate(composed("evaluate", [f"ckpt_path={trained_conditional.run_dir}", "split=val",
                                            "num_samples=2", f"output={tmp_path / 'v.json'}",
                                            "typicality.split=null"]))
    scores = read_scores(tmp_path / "v.csv")
    assert list(scores) == ["index", "label", "bpd", "bpd_iw"]
    assert scores["bpd_iw"].mean() == pytest.approx(result["bpd_iw"], rel=1e-12)
    assert (scores["bpd_iw"] <= scores["bpd"] + 1e-6).all()


@pytest.mark.parametrize("args, message", [
    (["typicality.fpr=1.5"], "strictly between 0 and 1"),
    (["typicality.batch_sizes=[1,0]"], "typicality.batch_sizes=[1, 0]"),
    (["typicality.max_images=0"], "typicality.max_images=0"),
    (["csv=3"], "csv=3"),
    (["output=same.json", "csv=same.json"], "the JSON output's path too"),
])
def test_evaluate_ood_mistakes_end_in_one_line(trained_digits, capsys, args, message):
    assert message in error_line(capsys, "evaluate", evaluate, [f"ckpt_path={trained_digits.run_dir}", *args])


# ---- typicality and AUROC on known numbers ----------------------------------------------------------

def test_typicality_is_the_distance_from_the_typical_bpd():
    assert typicality(torch.tensor([1.0, 2.0, 4.0]), 2.5).tolist() == [1.5, 0.5, 1.5]


def test_batch_test_on_known_numbers():
    reference = torch.tensor([1.0, 3.0] * 50)  # H = 2; every single image lies 1 bit/dim from it
    assert bootstrap_threshold(reference, 1, fpr=0.01) == 1.0
    assert bootstrap_threshold(torch.full((10,), 3.0), 5, fpr=0.01) == 0.0
    test = batch_test(torch.tensor([2.0, 2.0, 2.0, 4.0]), reference, 1, fpr=0.01)
    assert (test.threshold, test.num_batches, test.flagged) == (1.0, 4, 0.25)  # only 4 lies beyond 1 of H
    # means of two reference draws are 1, 2 or 3 (distance 1 with probability 1/2): the 99% quantile is 1
    assert batch_test(torch.full((6,), 2.0), reference, 2, fpr=0.01).summary() == {
        "batch_size": 2, "threshold": 1.0, "num_batches": 3, "flagged": 0.0}
    assert batch_test(torch.ones(3), reference, 10, fpr=0.01).flagged is None  # fewer images than one batch


def test_batch_test_flags_in_distribution_batches_at_the_false_positive_rate():
    generator = torch.Generator().manual_seed(0)
    reference, same = 3 + 0.2 * torch.randn(2, 5000, generator=generator)
    for m, tolerance in ((1, 0.02), (10, 0.04)):
        assert batch_test(same, reference, m, fpr=0.05).flagged == pytest.approx(0.05, abs=tolerance)
    # a set with the same spread around a slightly lower value: hardly visible per image, plain in batches of 25
    shifted = same - 0.15
    assert batch_test(shifted, reference, 1, fpr=0.05).flagged < 0.3
    assert batch_test(shifted, reference, 25, fpr=0.05).flagged > 0.9


def test_auroc_on_fake_scores():
    assert auroc([0, 1, 2], [3, 4, 5]) == 1.0
    assert auroc([3, 4, 5], [0, 1, 2]) == 0.0  # the other set scores as *more* in-distribution
    assert auroc([0, 2], [1, 3]) == 0.75  # 3 of the 4 (in, out) pairs are ordered
    assert auroc([1, 1], [1, 1]) == 0.5


def test_scores_csv_round_trip(tmp_path):
    values = torch.rand(7) * 4
    files = [f"/images/a,b {i}.png" for i in range(7)]  # a comma in a name stays in its cell
    write_scores(tmp_path / "s.csv", {"index": torch.arange(7), "file": files, "bpd": values})
    with open(tmp_path / "s.csv", newline="") as f:
        assert [row["file"] for row in csv.DictReader(f)] == files
    scores = read_scores(tmp_path / "s.csv")  # the numbers; the file column is text
    assert list(scores) == ["index", "bpd"]
    assert scores["index"].tolist() == list(range(7)) and scores["bpd"].tolist() == values.tolist()


def test_csv_of_a_folder_names_each_image_file(tmp_path):
    """data=folder: each row of evaluate.py's CSV names the file it scored (row i is item i of the split, and
    test_data checks that item i is read from file_names()[i])."""
    for split, n, seed in (("train", 6, 0), ("test", 3, 100)):
        for i in range(n):
            write_png(tmp_path / "pngs" / split / f"{i}.png", (8, 8), "L", seed=seed + i)
    data = ["data=folder", f"data.path={tmp_path / 'pngs'}", "data.image_size=8", "data.channels=1", "data.n_bits=3",
            "data.num_workers=0", "data.batch_size=2", "data.val_size=2", "model=glow_small",
            "model.hidden_channels=8"]
    train(compose_train(tmp_path, ["logger=csv", "~callbacks.rich_progress_bar", "trainer.max_steps=1",
                                   "trainer.accelerator=cpu", "test=false", *data]))
    result = evaluate(composed("evaluate", [f"ckpt_path={tmp_path / 'run'}", "split=test", "typicality.split=null",
                                            f"output={tmp_path / 'test.json'}"]))
    with open(tmp_path / "test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "file", "bpd"]
    assert [r["file"] for r in rows] == [str(tmp_path / "pngs" / "test" / f"{i}.png") for i in range(3)]
    assert result["num_images"] == 3 and all(math.isfinite(float(r["bpd"])) for r in rows)


# ---- scripts/ood_histogram.py -----------------------------------------------------------------------

def fake_scores(path, bpd: torch.Tensor, typical_bpd: float) -> None:
    write_scores(path, {"index": torch.arange(len(bpd)), "bpd": bpd, "typicality": typicality(bpd, typical_bpd)})


def test_histogram_and_aurocs_show_what_typicality_adds(tmp_path, capsys):
    """A set the model finds *more* likely than its own data (the Nalisnick et al. failure): bpd ranks it
    in-distribution, typicality separates it."""
    generator = torch.Generator().manual_seed(0)
    own = 3 + 0.2 * torch.randn(400, generator=generator)
    simpler = 2.2 + 0.1 * torch.randn(300, generator=generator)
    noise = 5 + 0.3 * torch.randn(300, generator=generator)
    typical_bpd = own.double().mean().item()
    for name, bpd in (("own", own), ("simpler", simpler), ("noise", noise)):
        fake_scores(tmp_path / f"last.eval-{name}-test.csv", bpd, typical_bpd)
    aurocs = ood_histogram(composed("ood_histogram", [
        f"in_csv={tmp_path / 'last.eval-own-test.csv'}", f"output={tmp_path / 'fig' / 'ood.png'}",
        f"ood_csv=[{tmp_path / 'last.eval-simpler-test.csv'},{tmp_path / 'last.eval-noise-test.csv'}]"]))
    assert aurocs["simpler-test"]["bpd"] < 0.01 and aurocs["simpler-test"]["typicality"] > 0.99
    assert aurocs["noise-test"]["bpd"] > 0.99 and aurocs["noise-test"]["typicality"] > 0.99
    out = capsys.readouterr().out
    assert "simpler-test" in out and "AUROC typicality" in out and f"wrote {tmp_path / 'fig' / 'ood.png'}" in out
    width, height = Image.open(tmp_path / "fig" / "ood.png").size
    assert width > 1.5 * height  # two panels side by side: bpd and typicality


def test_histogram_of_csvs_without_typicality_has_one_panel(tmp_path):
    for name, shift in (("a", 0.0), ("b", 1.0)):
        write_scores(tmp_path / f"{name}.csv", {"bpd": torch.arange(10.0) + shift})
    aurocs = ood_histogram(composed("ood_histogram", [f"in_csv={tmp_path / 'a.csv'}", f"ood_csv={tmp_path / 'b.csv'}"]))
    # out 1..10 against in 0..9: out = v beats v of the in values and ties one (v <= 9): (55 + 9/2) / 100
    assert aurocs == {"b": {"bpd": pytest.approx(0.595, abs=1e-12)}}
    width, height = Image.open(tmp_path / "a.ood.png").size
    assert width < 1.5 * height


def test_histogram_mistakes_end_in_one_line(tmp_path, capsys):
    good = tmp_path / "good.csv"
    write_scores(good, {"bpd": torch.ones(3)})
    (tmp_path / "other.csv").write_text("name,size\na,1\n")
    (tmp_path / "holes.csv").write_text("bpd\n1.0\n\n2.0,\n")
    cases = [
        ([], "in_csv is required"),
        ([f"in_csv={good}"], "ood_csv is required"),
        ([f"in_csv={good}", f"ood_csv={tmp_path / 'missing.csv'}"], "no such score CSV"),
        ([f"in_csv={good}", f"ood_csv={tmp_path / 'other.csv'}"], "is not a per-image score CSV"),
        ([f"in_csv={good}", f"ood_csv={good}"], "the same name"),
        ([f"in_csv={good}", f"ood_csv={tmp_path / 'other.csv'}", "bins=0"], "bins=0"),
    ]
    for args, message in cases:
        assert message in error_line(capsys, "ood_histogram", ood_histogram, args)
    nan = tmp_path / "nan.csv"
    write_scores(nan, {"bpd": torch.tensor([1.0, float("nan")])})
    assert "NaN or Inf" in error_line(capsys, "ood_histogram", ood_histogram, [f"in_csv={good}", f"ood_csv={nan}"])


@pytest.mark.slow  # two subprocesses (~30 s on 2 busy cores): `make test-full`
def test_histogram_script_runs(tmp_path):
    """The real entry point (the in-process tests above share its code)."""
    write_scores(tmp_path / "a.csv", {"bpd": torch.arange(6.0)})
    write_scores(tmp_path / "b.csv", {"bpd": torch.arange(6.0) + 10})
    run = run_entry("scripts/ood_histogram.py", [f"in_csv={tmp_path / 'a.csv'}", f"ood_csv={tmp_path / 'b.csv'}"],
                    tmp_path, env={"PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.output[-3000:]
    assert "1.0000" in run.stdout and (tmp_path / "a.ood.png").is_file()
    missing = run_entry("scripts/ood_histogram.py", [f"in_csv={tmp_path / 'a.csv'}"], tmp_path,
                        env={"PYTHONPATH": str(REPO)})
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        "error: ood_csv is required: one CSV of evaluate.py, or a list ood_csv=[a.csv,b.csv]"]


def test_typicality_cache_is_keyed_by_the_checkpoint(trained_digits, tmp_path):
    """A checkpoint that changes (last.ckpt of a run that trains on) gets its typical set recomputed."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes((trained_digits.run_dir / "checkpoints" / "last.ckpt").read_bytes())
    overrides = [f"ckpt_path={run_dir}", "which=last", "split=val", "typicality.max_images=50",
                 "typicality.batch_sizes=[]", "csv=false", f"output={tmp_path / 'e.json'}"]
    first = evaluate(composed("evaluate", overrides))
    cache = json.loads((run_dir / "checkpoints" / "last.typical-ema-val.json").read_text())
    assert cache["num_images"] == 50 and cache["typical_bpd"] == first["typicality"]["typical_bpd"]
    cache["bpd"] = [0.0] * 50  # a forged cache under the right key is believed ...
    (run_dir / "checkpoints" / "last.typical-ema-val.json").write_text(json.dumps(cache))
    assert evaluate(composed("evaluate", overrides))["typicality"]["typical_bpd"] == 0.0
    stat = ckpt.stat()
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # ... until the checkpoint changes
    assert evaluate(composed("evaluate", overrides))["typicality"]["typical_bpd"] == first["typicality"]["typical_bpd"]
