"""RealNVP (Dinh, Sohl-Dickstein & Bengio, 2017): checkerboard and channel-wise affine couplings."""

from __future__ import annotations

from functools import partial

from flowgen.errors import InvalidValueError
from flowgen.flows.actnorm import ActNorm
from flowgen.flows.base import FlowSequence
from flowgen.flows.coupling import Coupling
from flowgen.flows.memory import MEMORY_MODES
from flowgen.flows.nets import ResNetConditioner
from flowgen.flows.prior import TopPrior
from flowgen.flows.split import Split
from flowgen.flows.squeeze import Squeeze
from flowgen.models.multiscale import MultiScaleFlow
from flowgen.models.validation import check_choice, check_image_size, check_positive
from flowgen.transforms import TRANSFORMS


class RealNVP(MultiScaleFlow):
    """RealNVP's multi-scale architecture (paper section 3.6 and 4.1).

    Every scale but the last: 3 checkerboard couplings (alternating masks), squeeze,
    3 channel-wise couplings (alternating halves), factor out half of the channels.
    The last scale: 4 checkerboard couplings.  Affine couplings use the bounded scale
    α·tanh(h) with a learned per-channel α (``coupling="spline"``: rational-quadratic splines with
    ``spline_bins`` bins on [-spline_bound, spline_bound]); conditioners are ResNets (``num_blocks``
    residual blocks of width ``hidden_channels``).  The priors are standard normals, as in
    the paper (``learn_prior=True`` learns them as in Glow).

    The paper follows each coupling with a batch-normalisation layer used as a flow step;
    with ``actnorm=True`` (default) an ActNorm takes its place: the same per-channel affine
    form the paper's layer has at test time, initialised from the first batch, and exactly
    invertible in training mode too.

    ``memory``: what backprop keeps of each scale, as for Glow (``flowgen.flows.memory``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        scales: int = 2,
        hidden_channels: int = 64,
        num_blocks: int = 8,
        coupling: str = "affine",
        actnorm: bool = True,
        learn_prior: bool = False,
        num_classes: int | None = None,
        memory: str = "standard",
        spline_bins: int = 8,
        spline_bound: float = 3.0,
    ):
        check_positive(in_channels=in_channels, scales=scales, hidden_channels=hidden_channels)
        if num_blocks < 0:
            raise InvalidValueError(f"num_blocks must be >= 0, got {num_blocks}")
        check_choice("coupling", coupling, tuple(TRANSFORMS))
        check_choice("memory", memory, MEMORY_MODES)
        factor = 2 ** (scales - 1)
        check_image_size(image_size, factor, f"RealNVP with scales={scales} squeezes {scales - 1} times")
        if image_size // factor < 2:
            raise InvalidValueError(
                f"image_size={image_size} is too small for scales={scales}: the last scale would be "
                f"{image_size // factor}x{image_size // factor}, checkerboard couplings need at least 2x2"
            )
        if num_classes is not None:
            check_positive(num_classes=num_classes)
        conditioner = partial(ResNetConditioner, hidden_channels=hidden_channels, num_blocks=num_blocks)

        def couplings(channels: int, mask: str, count: int) -> list:
            layers = []
            for i in range(count):
                parity = i % 2  # alternate which half is transformed
                layers.append(Coupling(channels, conditioner, coupling, scale="tanh", mask=mask, parity=parity,
                                      spline_bins=spline_bins, spline_bound=spline_bound))
                if actnorm:
                    layers.append(ActNorm(channels))
            return layers

        flow_scales, splits = [], []
        channels, size = in_channels, image_size
        for _ in range(scales - 1):
            layers = couplings(channels, "checkerboard", 3)
            layers.append(Squeeze())
            channels, size = channels * 4, size // 2
            layers += couplings(channels, "channel", 3)
            flow_scales.append(FlowSequence(layers, memory=memory))
            split = Split(channels, learn_prior=learn_prior)
            splits.append(split)
            channels = split.keep_channels
        flow_scales.append(FlowSequence(couplings(channels, "checkerboard", 4), memory=memory))
        top = TopPrior(channels, size, size, learn=learn_prior, num_classes=num_classes)
        super().__init__(flow_scales, splits, top, in_channels, image_size)
