"""Sample grids: one row per temperature, drawn from FIXED noise so grids compare across steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import save_image

from flowgen.errors import InvalidValueError
from flowgen.sampling import image_grid, temperature_rows


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of training, write
    ``<dirpath>/step_<step>.png`` (rows = ``temperatures``, ``num_per_row`` columns) and log it
    to every active image-capable logger (wandb, TensorBoard).

    The noise comes from a generator reseeded with ``seed`` each time, so row r of every grid
    is the same latent noise ε at temperature T_r: only the weights change between grids.
    Class-conditional models draw column j from class j mod num_classes.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 500,
                 temperatures: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 1.0),
                 num_per_row: int = 8, seed: int = 0):
        super().__init__()
        if every_n_steps < 1:
            raise InvalidValueError(f"samples.every_n_steps must be >= 1, got {every_n_steps}")
        if any(t < 0 for t in temperatures):
            raise InvalidValueError(f"sample temperatures must be >= 0, got {list(temperatures)}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.temperatures = [float(t) for t in temperatures]
        self.num_per_row = num_per_row
        self.seed = seed
        self.last_path: Path | None = None

    def grid(self, pl_module) -> torch.Tensor:
        """(3, H', W') image grid of samples, rows = temperatures."""
        device = pl_module.device
        model = pl_module.eval_model
        num_classes = model.num_classes
        labels = None if num_classes is None else torch.arange(self.num_per_row, device=device) % num_classes
        images = temperature_rows(model, pl_module.num_levels, self.num_per_row, self.temperatures, labels,
                                  self.seed, device)
        return image_grid(images, self.num_per_row)

    @rank_zero_only
    def write(self, trainer, pl_module) -> Path:
        grid = self.grid(pl_module)
        step = trainer.global_step
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"step_{step:07d}.png"
        save_image(grid, path)
        caption = "rows: T = " + ", ".join(f"{t:g}" for t in self.temperatures)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], caption=[caption], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, step)
        self.last_path = path
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and not trainer.sanity_checking:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        step = trainer.global_step
        if self.last_path is None or self.last_path.name != f"step_{step:07d}.png":
            self.write(trainer, pl_module)
