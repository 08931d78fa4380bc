"""Glow (Kingma & Dhariwal, 2018): multi-scale flow of [ActNorm -> 1x1 conv -> coupling] steps."""

from __future__ import annotations

from functools import partial

from flowgen.flows.actnorm import ActNorm
from flowgen.flows.base import FlowSequence
from flowgen.flows.coupling import Coupling
from flowgen.flows.invconv import InvConv1x1, InvConv1x1LU
from flowgen.flows.memory import MEMORY_MODES
from flowgen.flows.nets import GlowConditioner
from flowgen.flows.permutation import ReversePermutation, ShufflePermutation
from flowgen.flows.prior import TopPrior
from flowgen.flows.split import Split
from flowgen.flows.squeeze import Squeeze
from flowgen.models.multiscale import MultiScaleFlow
from flowgen.models.validation import check_choice, check_image_size, check_positive
from flowgen.transforms import TRANSFORMS

PERMUTATIONS = ("lu", "conv", "shuffle", "reverse")


def make_permutation(kind: str, channels: int, seed: int):
    if kind == "lu":
        return InvConv1x1LU(channels)
    if kind == "conv":
        return InvConv1x1(channels)
    if kind == "shuffle":
        return ShufflePermutation(channels, seed)
    return ReversePermutation(channels)


class Glow(MultiScaleFlow):
    """Glow with L ``scales`` of [squeeze -> ``steps`` x (ActNorm, permutation, coupling) -> split].

    Defaults are the paper's CIFAR-10 settings (Table 4 / appendix: L=3 scales, 32 steps each, width 512,
    affine coupling, LU 1x1 convolutions, learned top prior, learned split priors).
    Affine couplings use Glow's bounded scale σ(h + 2); ``coupling="spline"`` uses rational-quadratic
    splines with ``spline_bins`` bins on [-spline_bound, spline_bound]; the coupling network is
    conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3 (ActNorm in hidden layers).
    With ``num_classes`` the top prior is class-conditional (Glow's y-conditioning).
    ``memory`` ("standard" | "checkpoint" | "invertible") chooses how backprop stores each
    scale's activations (``flowgen.flows.memory``); the model and its values are the same.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        scales: int = 3,
        steps: int = 32,
        hidden_channels: int = 512,
        coupling: str = "affine",
        permutation: str = "lu",
        num_classes: int | None = None,
        learn_top: bool = True,
        learn_split_prior: bool = True,
        memory: str = "standard",
        spline_bins: int = 8,
        spline_bound: float = 3.0,
    ):
        check_positive(in_channels=in_channels, scales=scales, steps=steps, hidden_channels=hidden_channels)
        check_choice("coupling", coupling, tuple(TRANSFORMS))
        check_choice("permutation", permutation, PERMUTATIONS)
        check_choice("memory", memory, MEMORY_MODES)
        check_image_size(image_size, 2**scales, f"Glow with scales={scales} squeezes {scales} times")
        if num_classes is not None:
            check_positive(num_classes=num_classes)
        conditioner = partial(GlowConditioner, hidden_channels=hidden_channels)

        flow_scales, splits = [], []
        channels, size = in_channels, image_size
        for scale in range(scales):
            channels, size = channels * 4, size // 2
            layers = [Squeeze()]
            for step in range(steps):
                layers += [
                    ActNorm(channels),
                    make_permutation(permutation, channels, seed=1000 * scale + step),
                    Coupling(channels, conditioner, transform=coupling, scale="sigmoid", mask="channel",
                             spline_bins=spline_bins, spline_bound=spline_bound),
                ]
            flow_scales.append(FlowSequence(layers, memory=memory))
            if scale < scales - 1:
                split = Split(channels, learn_prior=learn_split_prior)
                splits.append(split)
                channels = split.keep_channels
        top = TopPrior(channels, size, size, learn=learn_top, num_classes=num_classes)
        super().__init__(flow_scales, splits, top, in_channels, image_size)
