"""Sample quality: FID and KID of a flow's samples against real images.

One implementation serves ``evaluate.py metrics=[fid,kid]`` and the training callback
``callbacks.fid`` (flowgen/training/sample_quality.py). With f(x) the d = 2048 pool3 features of
Inception v3, (μ_r, Σ_r) and (μ_g, Σ_g) their mean and covariance over the real and the generated
images:

    FID = ||μ_r - μ_g||² + tr(Σ_r + Σ_g - 2 (Σ_r Σ_g)^{1/2})                    (Heusel et al. 2017)
    KID = mean over S random subsets of m real and m generated images of the unbiased MMD²
          with the kernel k(a, b) = (aᵀb / d + 1)³                               (Bińkowski et al. 2018)

The statistics are torchmetrics' (``FrechetInceptionDistance``, ``KernelInceptionDistance``); the
network is torch-fidelity's port of the Inception of the original TensorFlow FID code, with its
weights ``weights-inception-2015-12-05-6726825d.pth``. Its features are computed once per batch and
handed to both metrics.

What the network sees, identically for real and generated images: integer levels k of K become
uint8 round(255·k/(K-1)) (the identity for 8-bit data; generated images are first quantized to
their level, as saved samples are), a grayscale image is repeated to 3 channels, and the images
enter at their own resolution. Inside the network torch-fidelity resizes them to 299 × 299 with its
TensorFlow-1-compatible bilinear interpolation (no antialiasing), as the original code did, so the
numbers are comparable with published FIDs at the same number of images and the same reference set
(papers: 50000 samples against the training split). A stand-in feature network (any module mapping
uint8 (N, 3, H, W) to (N, d), with ``num_features = d``) takes the same road; the tests use one.

Randomness: the samples come from a private generator seeded with ``seed``, and KID's subsets
(drawn by torchmetrics from the global CPU generator) are drawn under ``torch.random.fork_rng`` with
that generator seeded, so a measurement is reproducible and moves none of the caller's RNG streams.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from flowgen.errors import InvalidValueError, UserError, one_line
from flowgen.sampling import check_sampling_options, sample_pixels

SAMPLE_METRICS = ("fid", "kid")  # measured on samples against real images
METRICS = ("bpd", *SAMPLE_METRICS)  # evaluate.py metrics=[...]; bpd = the exact likelihood of flowgen/evaluation.py
INCEPTION_FEATURES = "2048"  # torch-fidelity's name of the pool3 features, the ones FID and KID are defined on


class InceptionWeightsMissing(UserError):
    """The Inception weights are neither in the cache nor at the configured path, and cannot be downloaded."""


def inception_weights_url() -> str:
    """Where torch-fidelity downloads its Inception weights from."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def inception_cache_path() -> Path:
    """The file the weights are read from when no path is configured: the torch hub cache
    (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``), where torch-fidelity
    itself keeps them."""
    return Path(torch.hub.get_dir()) / "checkpoints" / inception_weights_url().rsplit("/", 1)[-1]


def inception_network(weights: str | None = None, option: str = "fid.weights") -> nn.Module:
    """torch-fidelity's Inception v3 (pool3 features), from ``weights`` or from the cache (downloaded once).

    ``option`` names the setting in the one-line error (``fid.weights``, ``callbacks.fid.weights``).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    url = inception_weights_url()
    name = url.rsplit("/", 1)[-1]
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InceptionWeightsMissing(f"{option}={weights} is not a file; it should be the Inception weights "
                                          f"{name} ({url})")
    else:
        path = inception_cache_path()
        if not path.is_file():
            _download(url, path, option)
    try:
        network = FeatureExtractorInceptionV3("inception-v3-compat", [INCEPTION_FEATURES],
                                              feature_extractor_weights_path=str(path))
    except Exception as exc:  # noqa: BLE001 - an unreadable or foreign file, whatever torch.load says
        raise UserError(f"{path} is not readable as the Inception weights {name} ({one_line(exc, 200)}); "
                        f"download it again from {url}") from None
    return InceptionPool3(network)


def _download(url: str, path: Path, option: str) -> None:
    """The weights into the cache; offline, one line that says which file to put where."""
    name = path.name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = torch.hub.HASH_REGEX.search(name).group(1)  # the file name carries its sha256 prefix
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix, progress=True)
    except OSError as exc:
        raise InceptionWeightsMissing(
            f"FID and KID need the Inception weights {name} and they cannot be downloaded here ({one_line(exc, 120)}): "
            f"put {url} at {path}, or pass {option}=/path/to/{name}") from None


class InceptionPool3(nn.Module):
    """uint8 images (N, 3, H, W) -> their (N, 2048) pool3 features (torch-fidelity resizes them to 299 x 299)."""

    num_features = int(INCEPTION_FEATURES)

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionPool3:
        return super().train(False)  # its batch norms keep their statistics

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)[0]


class _Features(nn.Module):
    """What the torchmetrics metrics are given: features already computed (once per batch, for all metrics)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def as_network_input(intensities: torch.Tensor) -> torch.Tensor:
    """Images with intensities k/(K-1) in [0, 1], (N, C, H, W) -> uint8 (N, 3, H, W), grayscale repeated."""
    if intensities.shape[1] not in (1, 3):
        raise InvalidValueError(f"FID and KID take images with 1 or 3 channels, got {intensities.shape[1]}")
    images = (intensities.float() * 255).round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class SampleQuality:
    """FID and/or KID between real images and generated ones, through one feature network.

    ``add(images, real)`` feeds a batch of [0, 1] intensities; the real statistics are kept by
    ``reset_generated`` (the callback computes them once per run), the generated ones are cleared.
    States live on ``device``; nothing is synchronised across processes (one process measures).
    """

    def __init__(self, feature: nn.Module, metrics: Sequence[str] = ("fid",), kid_subsets: int = 100,
                 kid_subset_size: int = 1000, device: torch.device | str = "cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        unknown = [m for m in metrics if m not in SAMPLE_METRICS]
        if unknown or not metrics:
            raise InvalidValueError(
                f"sample-quality metrics must be some of {', '.join(SAMPLE_METRICS)}, got {list(metrics)}")
        self.device = torch.device(device)
        self.feature = feature.to(self.device).eval()
        features = _Features(feature.num_features)
        common = {"reset_real_features": False, "sync_on_compute": False}
        self.metrics: dict[str, nn.Module] = {}
        if "fid" in metrics:
            self.metrics["fid"] = FrechetInceptionDistance(feature=features, **common)
        if "kid" in metrics:
            self.kid_subset_size = kid_subset_size
            with warnings.catch_warnings():  # it keeps every feature vector: 8 kB an image, known and fine
                warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
                self.metrics["kid"] = KernelInceptionDistance(feature=features, subsets=kid_subsets,
                                                              subset_size=kid_subset_size, **common)
        for metric in self.metrics.values():
            metric.to(self.device)
        self.num_real = 0
        self.num_generated = 0

    @torch.no_grad()
    def add(self, intensities: torch.Tensor, real: bool) -> None:
        features = self.feature(as_network_input(intensities.to(self.device)))
        for metric in self.metrics.values():
            metric.update(features, real=real)
        if real:
            self.num_real += intensities.shape[0]
        else:
            self.num_generated += intensities.shape[0]

    def reset_generated(self) -> None:
        for metric in self.metrics.values():
            metric.reset()  # reset_real_features=False: the real statistics stay
        self.num_generated = 0

    def compute(self, seed: int = 0) -> dict[str, float]:
        """{"fid": ..., "kid": ..., "kid_std": ..., "kid_subset_size": m} for the metrics asked.

        KID's subset size is the configured m, or the smaller set's size when a set is smaller than m
        (each subset estimate stays unbiased; only its spread grows)."""
        if min(self.num_real, self.num_generated) < 2:
            raise InvalidValueError(f"FID and KID need at least 2 real and 2 generated images, got {self.num_real} "
                             f"and {self.num_generated}")
        results = {}
        if "fid" in self.metrics:
            results["fid"] = float(self.metrics["fid"].compute())
        if "kid" in self.metrics:
            kid = self.metrics["kid"]
            kid.subset_size = min(self.kid_subset_size, self.num_real, self.num_generated)
            with torch.random.fork_rng(devices=[]):  # its subsets come from the global CPU generator
                torch.default_generator.manual_seed(seed)
                mean, std = kid.compute()
            results.update(kid=float(mean), kid_std=float(std), kid_subset_size=kid.subset_size)
        return results


def real_images(dataset: Dataset, num_levels: int, max_images: int | None = None, batch_size: int = 100,
                seed: int = 0) -> Iterator[torch.Tensor]:
    """Batches of a split's images as intensities k/(K-1) in [0, 1]: every image, or a random subset of
    ``max_images`` (seeded; drawn with a private generator, like the loader's workers)."""
    indices = range(len(dataset))
    if max_images is not None and max_images < len(dataset):
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=generator)[:max_images].sort().values.tolist()
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        generator=torch.Generator().manual_seed(seed))
    for batch in loader:
        yield batch[0].float() / (num_levels - 1)


def generated_images(model: nn.Module, num_levels: int, num_samples: int, temperature: float = 1.0,
                     batch_size: int = 100, seed: int = 0, device: torch.device | str = "cpu",
                     options: dict | None = None) -> Iterator[torch.Tensor]:
    """``num_samples`` samples at ``temperature`` in batches, as intensities in [0, 1] (``sample_pixels``).

    The noise comes from one private generator seeded with ``seed``; a class-conditional model draws
    sample i from class i mod C (equal shares of every class). ``options``: the model's own sampling
    options (TarFlow's denoise, guidance, ...), checked before the first draw."""
    options = dict(options or {})
    check_sampling_options(model, options)
    generator = torch.Generator(device=device).manual_seed(seed)
    num_classes = model.num_classes
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        labels = None if num_classes is None else torch.arange(start, start + n, device=device) % num_classes
        yield sample_pixels(model, num_levels, n, temperature, labels, generator, options)


def measure(quality: SampleQuality, generated: Iterator[torch.Tensor], real: Iterator[torch.Tensor] | None = None,
            seed: int = 0, on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """Feed ``real`` (None keeps the real statistics already in ``quality``) and ``generated`` (replacing
    earlier generated ones), then compute: the metrics, the numbers of images and the seconds it took.
    ``on_batch(num_images)`` after each batch (a progress bar)."""
    start = time.perf_counter()
    batches = [(real, True)] if real is not None else []
    quality.reset_generated()
    for images_of_a_set, is_real in [*batches, (generated, False)]:
        for images in images_of_a_set:
            quality.add(images, real=is_real)
            if on_batch is not None:
                on_batch(images.shape[0])
    results = quality.compute(seed)
    results.update(num_real=quality.num_real, num_generated=quality.num_generated,
                   seconds=time.perf_counter() - start)
    return results
