"""The model contract (flowgen/models/base.py): a model that implements it and nothing else goes
through every tool, and no module outside flowgen/models/ reads a family's own attributes."""

from __future__ import annotations

import ast
import csv
import math
from pathlib import Path

import pytest
import torch

from flowgen.cli.evaluate import evaluate
from flowgen.cli.manipulate import edit_attribute
from flowgen.cli.ood_histogram import ood_histogram
from flowgen.cli.sample import sample
from flowgen.cli.train import train
from flowgen.models import CNF, Glow, RealNVP, TarFlow
from flowgen.models.base import FlowModel
from tests.conftest import initialize_actnorms, jacobian_logdets, perturb_parameters
from tests.helpers.contract_model import PixelwiseFlow
from tests.test_configs import compose_train
from tests.test_ood import composed
from tests.train_runner import FAST, REPO

pytestmark = pytest.mark.usefixtures("single_thread")

HELPER_CONFIGS = REPO / "tests" / "helpers" / "configs"

FAMILIES = {
    "glow": lambda: Glow(1, 4, scales=2, steps=1, hidden_channels=4, num_classes=3),
    "realnvp": lambda: RealNVP(1, 4, scales=2, hidden_channels=4, num_blocks=1),
    "pixelwise": lambda: PixelwiseFlow(1, 4, num_classes=3),
    "tarflow": lambda: TarFlow(1, 4, patch_size=2, width=8, num_blocks=2, layers_per_block=1, num_heads=2,
                               num_classes=3, label_drop=0.1),
    # 20 RK4 steps of a tiny velocity: the solved map's exactness is the solver's (tests/test_cnf.py: dopri5)
    "cnf": lambda: CNF(1, 4, velocity="mlp", hidden=4, depth=1, num_classes=3, label_drop=0.1, solver="rk4",
                       step_size=0.05),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_keeps_the_contract(family):
    """forward/inverse/invert are exact inverses, the log-det is the Jacobian's, the named parts add up to
    log_prob, and sample draws images of input_shape for every label form."""
    torch.manual_seed(0)
    model = FAMILIES[family]().double()
    assert isinstance(model, FlowModel) and model.input_shape == (1, 4, 4)
    perturb_parameters(model, std=0.2)
    x, labels = torch.rand(3, 1, 4, 4, dtype=torch.float64) - 0.5, torch.tensor([0, 2, 1])
    initialize_actnorms(model, x, y=labels)
    model.eval()
    latents, logdet = model(x, labels)
    back, inverse_logdet = model.inverse(latents, labels)
    assert torch.allclose(back, x, atol=1e-10) and torch.allclose(model.invert(latents, labels), back, atol=1e-12)
    assert torch.allclose(inverse_logdet, -logdet, atol=1e-9)
    # a family's bijection may read the labels (TarFlow's class embedding): each image's Jacobian under its own
    jacobians = [jacobian_logdets(lambda v, i=i: model(v, labels[i : i + 1])[0], x[i : i + 1]) for i in range(3)]
    assert torch.allclose(logdet, torch.cat(jacobians), atol=1e-8)
    conditional = labels if model.num_classes else None
    parts = model.log_prob_parts(x, conditional)
    assert torch.allclose(parts.total(), model.log_prob(x, conditional), atol=1e-10)
    assert len(parts.terms) >= 2 and all(t.shape == (3,) for t in parts.terms.values())
    for y in (1, torch.tensor([0, 1])) if model.num_classes else (None,):
        images = model.sample(2, temperature=0.5, y=y, generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 1, 4, 4) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, temperature=-1.0)


def _train_watched(tmp_path, overrides: list[str]) -> tuple[Path, list[dict], list[dict]]:
    """A few steps of train() with the diagnostics and the invertibility monitor every 2 steps and a CSV logger:
    (run directory, every logged row, the rows with diagnostics)."""
    cfg = compose_train(tmp_path, [*overrides, "logger=csv", *FAST, "callbacks.diagnostics.every_n_steps=2",
                                   "callbacks.invertibility_monitor.every_n_steps=2", "trainer.limit_test_batches=1"])
    train(cfg)
    run = Path(cfg.paths.output_dir)
    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("diagnostics/bpd")]
    assert [int(r["step"]) for r in logged] == [2, 4, 6]
    return run, rows, logged


def test_a_contract_only_model_goes_through_every_tool(tmp_path, capsys):
    """train (diagnostics and the invertibility monitor on) -> sample.py's three modes -> evaluate.py with
    typicality on two splits -> the OOD histogram of their CSVs -> attribute editing."""
    run, rows, logged = _train_watched(tmp_path, [f"hydra.searchpath=[file://{HELPER_CONFIGS}]", "model=pixelwise",
                                                  "model.num_classes=${data.num_classes}", "run_name=contract"])
    for name in ("pixelwise/logdet_bpd", "prior_bpd_fraction", "pixelwise_log_scale_max"):
        assert math.isfinite(float(logged[-1][f"diagnostics/{name}"]))
    assert any(r.get("train/recon_error") for r in rows)

    for mode in ("sample", "interpolate", "reconstruct"):
        written = sample(composed("sample", [f"ckpt_path={run}", f"mode={mode}", "n=3", "num_images=3",
                                             f"output_dir={tmp_path / 'samples'}"]))
        assert written and all(Path(p).is_file() for p in written)

    csvs = []
    for split in ("val", "test"):
        result = evaluate(composed("evaluate", [f"ckpt_path={run}", f"split={split}", "typicality.max_images=60",
                                                "typicality.batch_sizes=[4]", f"output={tmp_path / split}.json"]))
        assert math.isfinite(result["bpd"]) and result["recon_error"] < 1e-4
        csvs.append(result["csv"])
    aurocs = ood_histogram(composed("ood_histogram", [f"in_csv={csvs[0]}", f"ood_csv={csvs[1]}",
                                                      f"output={tmp_path / 'ood.png'}"]))
    assert aurocs and (tmp_path / "ood.png").is_file()

    (strip,) = edit_attribute(composed("manipulate", [f"ckpt_path={run}", "attribute=3", "image=2",
                                                     "num_images=40", f"output_dir={tmp_path / 'edits'}"]))
    assert Path(strip).is_file()


def test_sampling_options_are_checked_against_the_model():
    """sample.py's sampling.* options reach a model's own sampler; a model without one says so in one line."""
    from flowgen.models import TarFlow
    from flowgen.sampling import check_sampling_options, sample_pixels, sampling_options

    glow, tarflow = FAMILIES["glow"](), TarFlow(1, 4, 2, 8, 1, 1, 2)
    assert sampling_options(glow) == [] and "inverse_method" in sampling_options(tarflow)
    with pytest.raises(ValueError, match="sampling.guidance: Glow.sample has no option 'guidance'; it takes none"):
        check_sampling_options(glow, {"guidance": 2.0})
    with pytest.raises(ValueError, match="sampling.guidnce: TarFlow.sample has no option 'guidnce'; its options"):
        check_sampling_options(tarflow, {"guidnce": 2.0})
    pixels = sample_pixels(tarflow, 17, 2, 1.0, options={"inverse_method": "jacobi", "jacobi_segments": 2})
    assert pixels.shape == (2, 1, 4, 4)


# configs/model/tarflow.yaml at a width that trains in a second: 16 tokens of 2x2 patches, 2 blocks of 1 layer
TINY_TARFLOW = ["model=tarflow", "model.width=16", "model.num_blocks=2", "model.layers_per_block=1",
                "model.num_heads=2"]


def test_a_class_conditional_tarflow_goes_through_every_tool(tmp_path):
    """TarFlow with label dropout and guidance, an EMA of decay 0.999, diagnostics and the invertibility monitor
    on: train -> sample.py (a grid per class, guidance and the inverse method chosen at sampling, interpolate,
    reconstruct) -> evaluate.py (bounds, CSV, typicality) -> attribute editing."""
    run, rows, logged = _train_watched(tmp_path, [*TINY_TARFLOW, "model.num_classes=${data.num_classes}",
                                                  "model.label_drop=0.1", "model.guidance=1.0", "ema_decay=0.999",
                                                  "run_name=tarflow"])
    last = {k[len("diagnostics/"):]: float(v) for k, v in logged[-1].items() if k.startswith("diagnostics/") and v}
    assert all(math.isfinite(v) for v in last.values())
    # per-block log-dets, the prior and the dequantization term add up to the bpd
    parts = ("block0/logdet_bpd", "block1/logdet_bpd", "prior_bpd", "dequantization_bpd")
    assert sum(last[p] for p in parts) == pytest.approx(last["bpd"], abs=1e-4)
    assert 0 < last["prior_bpd_fraction"] < 1.5 and "block1_log_scale_max" in last
    recon = [float(r["train/recon_error"]) for r in rows if r.get("train/recon_error")]
    assert recon and max(recon) < 1e-4
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert int(state["ema.num_updates"]) == 6 and "ema.module.blocks.1.class_embed.weight" in state

    def grid(name: str, *overrides: str) -> bytes:
        (path,) = sample(composed("sample", [f"ckpt_path={run}", "n=4", "label=3", f"output_dir={tmp_path / name}",
                                             *overrides]))
        return path.read_bytes()

    # guidance w at sampling: the run's own w (1.0) unless sampling.guidance says otherwise
    assert grid("default") == grid("same_w", "sampling.guidance=1.0")
    assert grid("unguided", "sampling.guidance=0.0") != grid("guided", "sampling.guidance=20.0")
    per_class = sample(composed("sample", [f"ckpt_path={run}", "n=3", "label=all", "sampling.inverse_method=jacobi",
                                           f"output_dir={tmp_path / 'classes'}"]))
    assert len(per_class) == 10 and all(p.is_file() for p in per_class)
    for mode in ("interpolate", "reconstruct"):
        (path,) = sample(composed("sample", [f"ckpt_path={run}", f"mode={mode}", "num_images=3",
                                             f"output_dir={tmp_path / mode}"]))
        assert path.is_file()

    result = evaluate(composed("evaluate", [f"ckpt_path={run}", "split=val", "typicality.max_images=60",
                                            "typicality.batch_sizes=[4]", f"output={tmp_path / 'val'}.json"]))
    assert result["weights"] == "ema" and result["num_images"] == 297
    assert math.isfinite(result["bpd"]) and result["bpd"] >= result["bpd_iw"] - 1e-9 and result["recon_error"] < 1e-4
    assert len(list(csv.DictReader(open(result["csv"])))) == 297
    assert math.isfinite(result["typicality"]["typical_bpd"])
    (strip,) = edit_attribute(composed("manipulate", [f"ckpt_path={run}", "attribute=3", "image=2",
                                                     "num_images=40", f"output_dir={tmp_path / 'edits'}"]))
    assert Path(strip).is_file()


# attributes only a multi-scale flow has: nothing outside flowgen/models/ may read them from a model
MULTISCALE_ATTRIBUTES = {"scales", "levels", "splits", "top_prior", "level_terms"}


def _root_name(node: ast.AST) -> str:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else ""


def test_no_module_outside_models_reads_a_multiscale_attribute():
    offenders = []
    for path in (REPO / "flowgen").rglob("*.py"):
        if path.parent.name == "models":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # configs may name a model's settings (cfg.model.scales); models and modules may not be asked
            if isinstance(node, ast.Attribute) and node.attr in MULTISCALE_ATTRIBUTES \
                    and not _root_name(node).endswith("cfg"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}")
        text = path.read_text()
        offenders += [f"{path.relative_to(REPO)}: hasattr on a model" for _ in [0] if "hasattr(model" in text]
    assert not offenders, offenders
