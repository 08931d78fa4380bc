"""What ``scripts/benchmark.py`` times: one training step and one sampling call of a model.

A ``Workload`` is built either from a flowgen run configuration (exactly the module
``train.py`` would build, with its precision, performance and memory settings) or, for the
side-by-side comparison, from normflows' Glow at the same architecture.  Both train on the same
random integer images, dequantized the same way, with the same optimizer and gradient clipping,
so the step does the same work; Lightning's loop and logging are outside both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from flowgen.build import build_module, num_levels_of, optimizer_factory
from flowgen.checkpoints.legacy import upgrade_state_dict
from flowgen.checkpoints.reading import check_state_matches, load_checkpoint
from flowgen.checkpoints.run_dir import find_checkpoint
from flowgen.errors import UserError
from flowgen.evaluation import PRECISIONS, autocast_context
from flowgen.likelihood import dequantize, nats_to_bpd
from flowgen.training.nan_guard import gradients_are_finite
from flowgen.training.schedules import warmup_then


@dataclass
class Workload:
    """A model with its optimizer and a fixed batch: ``train_step()`` and ``sample(n)`` are what is timed."""

    name: str
    settings: dict
    model: torch.nn.Module
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    batch_size: int
    num_dims: int
    precision: str
    train_step: Callable[[], torch.Tensor]  # forward + backward + clipping + optimizer step; returns the loss
    forward_loss: Callable[[], torch.Tensor]  # the forward alone (for saved-activation bytes)
    sample: Callable[[int], torch.Tensor]
    keep_freed_cpu_memory: bool = False  # glibc's heap setting, process-wide: applied before each of its steps
    notes: list[str] = field(default_factory=list)


def random_pixels(cfg: DictConfig, batch_size: int, device: torch.device, seed: int) -> torch.Tensor:
    """A fixed batch of integer images of the configured data shape (no dataset is read)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size))
    return torch.randint(0, num_levels_of(cfg), shape, generator=generator).to(device)


def _optimizer_step(loss: torch.Tensor, parameters, optimizer, clip: float | None, scaler, guard: bool) -> None:
    """backward, then what the trainer does before and at the optimizer step (clip, NaN guard, step)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(parameters, clip)
    skip = guard and not bool(gradients_are_finite(parameters) & torch.isfinite(loss.detach()))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif not skip:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _train_step(forward_loss, parameters, optimizer, clip, scaler, guard: bool, warmup_steps: int
                ) -> Callable[[], torch.Tensor]:
    """One training step as the trainer runs it, learning-rate schedule included: the run's linear
    warm-up (``scheduler.warmup_steps``, then constant). A deep flow at the full rate from its first
    step can diverge within the benchmark's few steps (Glow K=32 did, to an inf loss), and a
    diverged model times other code paths than a training one."""
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then("constant", warmup_steps))

    def train_step() -> torch.Tensor:
        loss = forward_loss()
        _optimizer_step(loss, parameters, optimizer, clip, scaler, guard)
        schedule.step()
        return loss.detach()
    return train_step


def _sampler(module: torch.nn.Module, draw: Callable[[int], torch.Tensor], device, precision: str):
    """``draw(n)`` in eval mode, without autograd, under the workload's autocast; training mode after."""
    @torch.no_grad()
    def sample(n: int) -> torch.Tensor:
        module.eval()
        try:
            with autocast_context(device, precision):
                return draw(n)
        finally:
            module.train()
    return sample


def _grad_scaler(precision: str, device: torch.device):
    return torch.amp.GradScaler(device.type) if PRECISIONS[precision] is torch.float16 else None


def load_weights(module, path: str) -> str:
    """Copy a checkpoint's model weights (a .ckpt, or a run directory's last.ckpt) into the module's model and
    its EMA copy: the checkpoint's EMA weights when it kept them (those sample.py uses), else its trained ones.
    Returns what was loaded, for the record."""
    if not Path(path).expanduser().exists():
        raise UserError(f"benchmark.weights={path}: no such checkpoint file or run directory")
    ckpt, _ = find_checkpoint(path, "last")
    state = load_checkpoint(ckpt)["state_dict"]
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "model."
    weights = upgrade_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                 module.model.state_dict())
    check_state_matches(weights, module.model, ckpt)
    for model in (module.model, *([module.ema.module] if module.ema is not None else [])):
        model.load_state_dict(weights)
    return f"{ckpt} ({'ema' if prefix == 'ema.module.' else 'raw'} weights)"


def flowgen_workload(cfg: DictConfig, device: torch.device, name: str = "flowgen") -> Workload:
    """The module ``train.py`` builds for ``cfg`` (model, dequantizer, optimizer, performance settings), with
    the weights of ``benchmark.weights`` when given."""

    torch.manual_seed(cfg.seed)
    num_levels = num_levels_of(cfg)
    module = build_module(cfg, num_levels)
    weights = OmegaConf.select(cfg, "benchmark.weights")
    loaded = load_weights(module, str(weights)) if weights else None
    module = module.to(device)
    module.train()
    batch_size = int(cfg.data.batch_size)
    pixels = random_pixels(cfg, batch_size, device, cfg.seed)
    parameters = [p for m in (module.model, module.dequantizer) for p in m.parameters() if p.requires_grad]
    optimizer = module.optimizer_factory(module.parameter_groups())  # the run's weight-decay groups too
    precision = str(cfg.trainer.precision)
    scaler = _grad_scaler(precision, device)
    clip = cfg.trainer.get("gradient_clip_val")
    guard = bool(OmegaConf.select(cfg, "callbacks.nan_guard"))

    def forward_loss() -> torch.Tensor:
        with autocast_context(device, precision):
            nll = module.nll_nats((pixels, None))
        return nats_to_bpd(nll, module.num_dims).mean()

    train_step = _train_step(forward_loss, parameters, optimizer, clip, scaler, guard,
                             int(cfg.scheduler.warmup_steps))
    sample = _sampler(module, lambda n: module.sample_pixels(n, float(cfg.benchmark.temperature)), device, precision)

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    settings = {
        "implementation": "flowgen",
        "model": {k: v for k, v in model_cfg.items() if k != "_target_"} | {"class": model_cfg["_target_"]},
        "dequantization": str(OmegaConf.select(cfg, "dequantization._target_")),
        "precision": precision,
        "channels_last": bool(OmegaConf.select(cfg, "performance.channels_last", default=False)),
        "compile": str(OmegaConf.select(cfg, "performance.compile", default="none")),
        "keep_freed_cpu_memory": _keeps_freed_cpu_memory(cfg),
        "memory": str(cfg.model.get("memory", "standard")),
        "batch_size": batch_size,
        "optimizer": str(cfg.optimizer._target_),
        "gradient_clip_val": clip,
        "nan_guard": guard,
        "weights": loaded or "initialisation",
    }
    return Workload(name=name, settings=settings, model=module.model, parameters=parameters, optimizer=optimizer,
                    batch_size=batch_size, num_dims=module.num_dims, precision=precision, train_step=train_step,
                    forward_loss=forward_loss, sample=sample, keep_freed_cpu_memory=_keeps_freed_cpu_memory(cfg))


def _keeps_freed_cpu_memory(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "performance.keep_freed_cpu_memory", default=False))


def normflows_glow(cfg: DictConfig):
    """normflows' multi-scale Glow at flowgen's architecture: same L, K, width, coupling, 1x1 convolution
    (LU or not), ActNorm in the coupling networks, zero-initialised last layers.

    The remaining differences are normflows' own: its factored-out latents have unconditional
    learned Gaussians (flowgen's Glow predicts them from the kept half, a few small convolutions)
    and its coupling keeps the first ceil(C/2) channels.
    """
    try:
        import normflows as nf
    except ImportError:
        raise UserError("benchmark.compare=[normflows] needs the normflows package: pip install normflows") from None
    model_cfg = cfg.model
    if not str(model_cfg._target_).endswith("Glow"):
        raise UserError(f"the normflows comparison builds Glow only; model={model_cfg._target_} has no normflows twin")
    if model_cfg.permutation not in ("lu", "conv"):
        raise UserError(f"normflows' Glow has no permutation={model_cfg.permutation}; use model.permutation=lu or conv")
    scales, steps, width = int(model_cfg.scales), int(model_cfg.steps), int(model_cfg.hidden_channels)
    channels, size = int(model_cfg.in_channels), int(model_cfg.image_size)
    q0, flows, merges = [], [], []
    for i in range(scales):  # normflows lists its levels (our scales) from the top (coarsest) down
        step_channels = channels * 2 ** (scales + 1 - i)  # 4^(L-i) channels after L-i squeezes, halved L-i-1 times
        level = [nf.flows.GlowBlock(step_channels, width, scale=model_cfg.coupling == "affine", scale_map="sigmoid",
                                    split_mode="channel", use_lu=model_cfg.permutation == "lu", net_actnorm=True)
                 for _ in range(steps)]
        level.append(nf.flows.Squeeze())
        flows.append(level)
        factor = 2 ** (scales - i)
        if i > 0:
            merges.append(nf.flows.Merge())
            latent_shape = (channels * factor, size // factor, size // factor)
        else:
            latent_shape = (channels * factor * 2, size // factor, size // factor)
        q0.append(nf.distributions.DiagGaussian(latent_shape))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def normflows_workload(cfg: DictConfig, device: torch.device, name: str = "normflows") -> Workload:
    """normflows' Glow trained on the same batch, noise, optimizer and clipping as ``flowgen_workload``."""
    import normflows

    torch.manual_seed(cfg.seed)
    model = normflows_glow(cfg).to(device)
    model.train()
    num_levels = num_levels_of(cfg)
    batch_size = int(cfg.data.batch_size)
    pixels = random_pixels(cfg, batch_size, device, cfg.seed)
    num_dims = math.prod(pixels.shape[1:])
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_factory(cfg)(parameters)
    precision = str(cfg.trainer.precision)
    scaler = _grad_scaler(precision, device)
    clip = cfg.trainer.get("gradient_clip_val")

    def forward_loss() -> torch.Tensor:
        y = dequantize(pixels, torch.rand(pixels.shape, device=device), num_levels)
        with autocast_context(device, precision):
            nll = -model.log_prob(y, None) + num_dims * math.log(num_levels)
        return nats_to_bpd(nll, num_dims).mean()

    train_step = _train_step(forward_loss, parameters, optimizer, clip, scaler, False,
                             int(cfg.scheduler.warmup_steps))
    sample = _sampler(model, lambda n: model.sample(n, temperature=float(cfg.benchmark.temperature))[0], device,
                      precision)

    settings = {
        "implementation": f"normflows {normflows.__version__}",
        "model": {"class": "normflows.MultiscaleFlow (GlowBlock)", "scales": int(cfg.model.scales),
                  "steps": int(cfg.model.steps), "hidden_channels": int(cfg.model.hidden_channels),
                  "coupling": str(cfg.model.coupling), "permutation": str(cfg.model.permutation)},
        "precision": precision, "batch_size": batch_size, "optimizer": str(cfg.optimizer._target_),
        "gradient_clip_val": clip, "keep_freed_cpu_memory": _keeps_freed_cpu_memory(cfg),
    }
    # the same process setting as the flowgen workload it is compared with
    return Workload(name=name, settings=settings, model=model, parameters=parameters, optimizer=optimizer,
                    batch_size=batch_size, num_dims=num_dims, precision=precision, train_step=train_step,
                    forward_loss=forward_loss, sample=sample, keep_freed_cpu_memory=_keeps_freed_cpu_memory(cfg))


def variant_config(cfg: DictConfig, overrides: str) -> DictConfig:
    """``cfg`` with ``key=value`` overrides (space separated) applied, e.g. ``trainer.precision=bf16-mixed``."""
    items = overrides.split()
    bad = [item for item in items if "=" not in item or item.startswith(("+", "~"))]
    if bad:
        raise UserError(f"benchmark.compare entry {overrides!r}: expected key=value overrides, got {bad[0]!r}")
    for item in items:
        key = item.split("=", 1)[0]
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise UserError(f"benchmark.compare entry {overrides!r}: {key} is not a key of the config")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(items))


def build_workloads(cfg: DictConfig, device: torch.device) -> list[Workload]:
    """The configured model first, then every ``benchmark.compare`` entry (normflows or overrides)."""
    build = partial(flowgen_workload, device=device)
    workloads = [build(cfg, name="flowgen")]
    for entry in cfg.benchmark.get("compare") or []:
        entry = str(entry).strip()
        if entry == "normflows":
            workloads.append(normflows_workload(cfg, device))
        else:
            workloads.append(build(variant_config(cfg, entry), name=f"flowgen {entry}"))
    return workloads
