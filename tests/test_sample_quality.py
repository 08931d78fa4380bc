"""FID and KID (flowgen/sample_quality.py): the metrics, evaluate.py metrics=[fid,kid] and callbacks.fid.

Every test runs the code the Inception network runs in, with a small stand-in feature network (the
weights are not here, and no test touches the network); the offline error is the real one.
"""

from __future__ import annotations

import csv
import json
import math
import urllib.request
from functools import partial

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import flowgen.cli.evaluate as evaluate_cli
from flowgen.build import restore_run
from flowgen.cli.errors import run_reporting_errors
from flowgen.data import ImageDataModule
from flowgen.dequantization import UniformDequantization
from flowgen.errors import UserError
from flowgen.models import Glow, TarFlow
from flowgen.sample_quality import (
    SampleQuality,
    as_network_input,
    generated_images,
    inception_cache_path,
    inception_network,
    measure,
    real_images,
)
from flowgen.training import FlowModule
from flowgen.training.sample_quality import SampleQualityMonitor
from tests.conftest import perturb_parameters
from tests.train_runner import REPO

pytestmark = pytest.mark.usefixtures("single_thread")

K = 17  # the digits' number of levels


class StandInFeatures(nn.Module):
    """A fixed random convolution and mean pooling: uint8 (N, 3, H, W) -> (N, 6), like Inception's contract."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        return nn.functional.conv2d(images.float() / 255, self.weight).tanh().mean(dim=(2, 3))


def batches(images: torch.Tensor, size: int = 32):
    return iter(images.split(size))


@pytest.mark.parametrize("channels", [1, 3])
def test_identical_sets_score_zero_and_shifted_sets_do_not(channels):
    torch.manual_seed(0)
    images = torch.rand(96, channels, 8, 8)
    shifted = (images + 0.15).clamp(0, 1)
    quality = SampleQuality(StandInFeatures(), ["fid", "kid"], kid_subsets=20, kid_subset_size=48)
    rng = torch.get_rng_state()
    same = measure(quality, batches(images), batches(images))
    apart = measure(quality, batches(shifted))  # the real statistics are kept, the generated ones replaced
    assert torch.equal(torch.get_rng_state(), rng)  # KID's subsets are drawn under fork_rng
    assert same["num_real"] == same["num_generated"] == apart["num_generated"] == 96
    assert abs(same["fid"]) < 1e-6 and apart["fid"] > 1e-3
    # KID of a set against itself: the unbiased MMD² of two random subsets, about 0 (it may be < 0)
    assert abs(same["kid"]) < 0.05 * apart["kid"] and apart["kid"] > 3 * apart["kid_std"]
    assert measure(quality, batches(shifted))["kid"] == apart["kid"]  # the seed fixes KID's subsets


def test_kid_subsets_shrink_to_the_smaller_set():
    quality = SampleQuality(StandInFeatures(), ["kid"], kid_subsets=5, kid_subset_size=1000)
    result = measure(quality, batches(torch.rand(10, 3, 8, 8)), batches(torch.rand(20, 3, 8, 8)))
    assert result["kid_subset_size"] == 10 and math.isfinite(result["kid"]) and "fid" not in result


def test_images_reach_the_network_as_uint8_levels_with_three_channels():
    levels = torch.arange(32).reshape(1, 1, 4, 8)  # 5-bit levels k as intensities k/31
    network_input = as_network_input(levels / 31)
    assert network_input.dtype == torch.uint8 and network_input.shape == (1, 3, 4, 8)
    assert torch.equal(network_input[0, 2].flatten().long(), (levels.flatten() * 255 / 31).round().long())
    eight_bit = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(as_network_input(eight_bit / 255), eight_bit)  # the identity on 8-bit images


def test_real_images_take_a_seeded_subset():
    dataset = torch.utils.data.TensorDataset(torch.arange(50).reshape(50, 1, 1, 1), torch.zeros(50))
    subset = torch.cat(list(real_images(dataset, 50, max_images=20, batch_size=8, seed=3)))
    again = torch.cat(list(real_images(dataset, 50, max_images=20, batch_size=8, seed=3)))
    assert subset.shape == (20, 1, 1, 1) and torch.equal(subset, again)
    assert len(set((subset * 49).round().flatten().tolist())) == 20
    assert torch.cat(list(real_images(dataset, 50, batch_size=64))).shape[0] == 50


def test_generated_images_pass_the_model_options_and_draw_every_class():
    torch.manual_seed(0)
    model = TarFlow(1, 8, 2, 16, 2, 1, 2, num_classes=3, noise_std=0.1).eval()
    perturb_parameters(model, std=0.05)
    rng = torch.get_rng_state()

    def draw(**options):
        return torch.cat(list(generated_images(model, K, 6, 1.0, batch_size=4, seed=1, options=options)))

    denoised, raw = draw(denoise=True), draw(denoise=False)
    assert denoised.shape == (6, 1, 8, 8) and torch.equal(denoised, draw(denoise=True))  # seeded
    assert not torch.equal(denoised, raw)  # the option reached TarFlow's sampler (a Tweedie step or none)
    assert torch.equal(torch.get_rng_state(), rng)
    labels = []
    with pytest.MonkeyPatch.context() as patch:  # sample i comes from class i mod 3
        patch.setattr(model, "sample", lambda n, temperature, y, generator, **kw: labels.append(y) or
                      torch.zeros(n, 1, 8, 8))
        draw()
    assert torch.cat(labels).tolist() == [0, 1, 2, 0, 1, 2]


# ---- the Inception weights: cache, configured file, offline ---------------------------------------

def offline(monkeypatch, tmp_path):
    """No network: an empty torch cache and every HTTPS request refused at a closed local port."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # a fresh opener reads the proxy settings


def evaluate_error(capsys, overrides: list[str]) -> str:
    """evaluate.py's path in process; it exits with status 2 and prints one error line, which is returned."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(evaluate_cli.evaluate, cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_offline_without_the_weights_one_line_names_the_file_the_cache_and_the_option(
        monkeypatch, tmp_path, capsys):
    offline(monkeypatch, tmp_path)
    line = evaluate_error(capsys, [f"ckpt_path={tmp_path / 'run'}", "metrics=[fid]"])
    cache = inception_cache_path()
    assert str(cache).startswith(str(tmp_path / "torch" / "hub" / "checkpoints"))
    assert f"at {cache}" in line and "fid.weights=/path/to/weights-inception-2015-12-05-6726825d.pth" in line
    assert "cannot be downloaded" in line and not cache.exists()
    line = evaluate_error(capsys, [f"ckpt_path={tmp_path / 'run'}", "metrics=[bpd,kid]",
                                   f"fid.weights={tmp_path / 'nowhere.pth'}"])
    assert f"fid.weights={tmp_path / 'nowhere.pth'} is not a file" in line


def test_a_file_in_the_cache_is_used_without_a_download(monkeypatch, tmp_path):
    offline(monkeypatch, tmp_path)
    cache = inception_cache_path()
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not a state dict")
    with pytest.raises(Exception, match="is not readable as the Inception weights") as info:
        inception_network(None, option="callbacks.fid.weights")
    assert "cannot be downloaded" not in str(info.value)


# ---- evaluate.py metrics=[fid,kid] ------------------------------------------------------------------

def test_evaluate_writes_fid_and_kid_of_the_ema_samples(trained_digits, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(evaluate_cli, "inception_network", lambda weights: StandInFeatures())
    GlobalHydra.instance().clear()
    options = ["fid.num_samples=40", "fid.max_real=50", "fid.batch_size=16", "fid.temperature=0.8", "fid.seed=5",
               "fid.kid_subsets=10", "fid.kid_subset_size=30"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt_path={trained_digits.run_dir}", "metrics=[fid,kid]",
                                             f"output={tmp_path / 'eval.json'}", *options])
    result = evaluate_cli.evaluate(cfg)
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["fid"] == result["fid"] > 0 and written["kid"] == result["kid"]
    assert written["metrics"] == ["fid", "kid"] and "bpd" not in written and "csv" not in written
    assert written["sample_quality"]["num_generated"] == 40 and written["sample_quality"]["num_real"] == 50
    assert written["sample_quality"]["kid_subset_size"] == 30 and written["weights"] == "ema"
    assert not (tmp_path / "eval.csv").exists()
    assert "FID (40 samples at T=0.8 vs 50 images)" in capsys.readouterr().out

    # the same numbers from the library, on the restored EMA weights and the test split
    run = restore_run(trained_digits.run_dir, use_ema=True)
    datamodule = evaluate_cli.instantiate_data(run.cfg.data)
    quality = SampleQuality(StandInFeatures(), ["fid", "kid"], kid_subsets=10, kid_subset_size=30)
    direct = measure(quality, generated_images(run.model, K, 40, 0.8, batch_size=16, seed=5),
                     real_images(datamodule.eval_dataset("test"), K, 50, batch_size=16, seed=5), seed=5)
    assert direct["fid"] == pytest.approx(result["fid"], rel=1e-5)
    assert direct["kid"] == pytest.approx(result["kid"], rel=1e-5)


def test_a_sampling_option_the_model_lacks_is_refused(trained_digits, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_cli, "inception_network", lambda weights: StandInFeatures())
    line = evaluate_error(capsys, [f"ckpt_path={trained_digits.run_dir}", "metrics=[fid]",
                                   "fid.sampling.denoise=false"])
    assert "sampling.denoise" in line and "Glow" in line


# ---- callbacks.fid ----------------------------------------------------------------------------------

def _fit(tmp_path, callbacks: list) -> torch.Tensor:
    torch.manual_seed(0)
    model = Glow(in_channels=1, image_size=8, scales=2, steps=2, hidden_channels=8)
    module = FlowModule(model=model, dequantizer=UniformDequantization(K), num_levels=K, ema_decay=0.9,
                        optimizer=partial(torch.optim.Adam, lr=1e-3))
    data = ImageDataModule(name="digits", image_size=8, channels=1, n_bits=None, num_levels=K, batch_size=16,
                           num_workers=0, val_size=297)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=4, accelerator="cpu", limit_val_batches=0,
                        logger=CSVLogger(tmp_path, name="csv"), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_the_callback_logs_fid_and_kid_and_leaves_training_unchanged(tmp_path):
    monitor = SampleQualityMonitor(every_n_steps=2, metrics=["fid", "kid"], num_samples=24, max_real=32,
                                   batch_size=12, kid_subsets=5, kid_subset_size=16, feature=StandInFeatures())
    watched = _fit(tmp_path / "with", [monitor])
    plain = _fit(tmp_path / "without", [])
    assert torch.equal(watched, plain)  # same weights bit for bit: the RNG streams never moved
    rows = list(csv.DictReader((tmp_path / "with" / "csv" / "version_0" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("val/fid")]
    assert [int(r["step"]) for r in logged] == [2, 4]
    assert all(float(r["val/fid"]) > 0 and math.isfinite(float(r["val/kid"])) for r in logged)
    assert monitor._quality.num_real == 32 and monitor._quality.num_generated == 24


def test_the_callback_refuses_a_bad_setting():
    with pytest.raises(ValueError, match="callbacks.fid.metrics"):
        SampleQualityMonitor(metrics=["bpd"])
    with pytest.raises(ValueError, match="callbacks.fid.num_samples must be an int >= 2"):
        SampleQualityMonitor(num_samples=1)


@pytest.mark.slow  # builds and runs the 24M-parameter Inception on the CPU: about 10 s
def test_the_inception_network_loads_from_a_file_and_gives_pool3_features(tmp_path):
    import torch_fidelity.feature_extractor_inceptionv3 as torch_fidelity_inception

    # the real architecture with random weights, written the way the real weights file is (a state dict)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(torch_fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *args: None)
        random = torch_fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(random.state_dict(), tmp_path / "inception.pth")
    network = inception_network(str(tmp_path / "inception.pth"))
    assert network.num_features == 2048 and not network.training
    with torch.no_grad():
        gray = network(as_network_input(torch.rand(2, 1, 8, 8)))
        color = network(as_network_input(torch.rand(2, 3, 32, 32)))
    assert gray.shape == color.shape == (2, 2048) and torch.isfinite(color).all()
    quality = SampleQuality(network, ["fid"])
    assert measure(quality, iter([torch.rand(3, 3, 16, 16)]), iter([torch.rand(3, 3, 16, 16)]))["fid"] > 0


def test_the_callback_needs_the_weights_when_it_is_made(monkeypatch, tmp_path):
    offline(monkeypatch, tmp_path)  # made before the run writes anything: train.py leaves no run directory
    with pytest.raises(UserError, match=r"cannot be downloaded .* callbacks\.fid\.weights=/path/to/weights-inception"):
        SampleQualityMonitor()
