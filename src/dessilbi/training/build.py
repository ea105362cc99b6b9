"""A run's parts from its configuration: data, model (seeded), optimizer, schedule, target."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..core.optim import DessiLBI
from ..core.optimizers import create_optimizer
from ..core.target import SparsityTarget
from ..core.units import coupled_parameters, stem_of
from ..files import load_checkpoint
from ..sparsity.masks import Mask, unwrap
from ..structure.cost import MacsModel
from ..zoo.data import DataInfo, load_dataset
from ..zoo.models import create_model
from .config import ConfigError, NetConfig, ScheduleConfig, TrainConfig

__all__ = ["Built", "Dist", "batches_per_epoch", "build", "fixed_mask", "make_scheduler",
           "model_spec"]


def model_spec(net: NetConfig, info: DataInfo) -> dict[str, Any]:
    """The keyword arguments of :func:`dessilbi.zoo.models.create_model` for a run's network
    (what a saved pruned or grown model records to rebuild it)."""
    return {"name": net.model, "num_classes": info.num_classes,
            "in_channels": info.in_channels, "image_size": info.image_size, "width": net.width}


@dataclass(frozen=True)
class Dist:
    """Process-group coordinates (rank 0 of 1 without ``torchrun``)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def _device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"invalid device={name!r}: CUDA is not available here")
    return dev


def make_scheduler(sched: ScheduleConfig, opt: torch.optim.Optimizer) -> Any:
    """The per-epoch learning-rate scheduler of the schedule section."""
    from torch.optim import lr_scheduler as ls

    if sched.kind == "multistep":
        return ls.MultiStepLR(opt, milestones=sched.milestones, gamma=sched.lr_gamma)
    if sched.kind == "cosine":
        return ls.CosineAnnealingLR(opt, T_max=sched.epochs)
    if sched.kind == "step":
        return ls.StepLR(opt, step_size=sched.step_size, gamma=sched.lr_gamma)
    return ls.LambdaLR(opt, lambda _: 1.0)


@dataclass
class Built:
    """What a run is made of."""

    cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_set: Dataset
    test_set: Dataset
    info: DataInfo
    device: torch.device
    dataset_note: str
    example: Tensor
    target: SparsityTarget | None = None
    total_steps: int = 0  # optimizer steps of the whole run (sets ν when none is given)


def build(cfg: TrainConfig, d: Dist | None = None) -> Built:
    """Data, model (seeded), optimizer and scheduler of ``cfg``; the dataset resolved."""
    d = d or Dist()
    cfg, note = cfg.validate().resolved()
    device = _device(cfg.device, d)
    train_set, test_set, info = load_dataset(
        cfg.dataset, cfg.data_dir, download=cfg.download,
        synthetic_size=tuple(int(v) for v in cfg.synthetic_size),  # type: ignore[arg-type]
        seed=cfg.seed,
    )
    torch.manual_seed(cfg.seed)
    model = create_model(**model_spec(cfg.net, info))
    if cfg.init_from:
        state = load_checkpoint(cfg.init_from)
        model.load_state_dict(state.get("model", state))
    if cfg.mask:
        Mask.load(cfg.mask).apply_(model)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    example = _example(test_set, device)
    steps = cfg.epochs * batches_per_epoch(cfg, len(train_set), d)  # type: ignore[arg-type]
    opt = create_optimizer(cfg.optim, model, example, total_steps=steps)
    target = None
    aimed = cfg.target_density is not None or cfg.target_macs is not None
    if aimed and isinstance(opt, DessiLBI):
        cost = None
        if cfg.target_macs is not None:
            cost = MacsModel.from_model(model, example, opt.penalised_params())
        target = SparsityTarget(opt, cfg.target_density, steps, macs=cfg.target_macs, cost=cost,
                                select_at=cfg.select_at, freeze=cfg.freeze, pull=cfg.pull,
                                schedule=cfg.support, start_at=cfg.start_at,
                                reserve=cfg.reserve, score=cfg.score,
                                width_prior=cfg.width_prior,
                                coupled=coupled_parameters(model, example),
                                whole=_first_layer(model, example, opt, cfg.keep_first_layer))
    return Built(cfg, model, opt, make_scheduler(cfg.sched, opt), train_set, test_set, info,
                 device, note, example, target, steps)


def _first_layer(model: nn.Module, example: Tensor, opt: DessiLBI, keep: bool) -> list[Tensor]:
    """The weight of the layer that reads the input, when it is kept whole and penalised."""
    if not keep:
        return []
    weight = getattr(stem_of(model, example), "weight", None)
    return [weight] if any(weight is p for p in opt.penalised_params()) else []


def _example(dataset: Dataset, device: torch.device) -> Tensor:
    """One input, batched: enough to trace the model's graph."""
    return dataset[0][0].unsqueeze(0).to(device)


def batches_per_epoch(cfg: TrainConfig, n_train: int, d: Dist) -> int:
    per_rank = n_train // d.world if d.world > 1 else n_train
    n = math.ceil(per_rank / max(cfg.batch_size // d.world, 1))
    return min(n, cfg.max_train_batches) if cfg.max_train_batches else n


def fixed_mask(cfg: TrainConfig, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(parameter, mask) pairs of ``cfg.mask`` on the model's device and dtype."""
    if not cfg.mask:
        return []
    mask = Mask.load(cfg.mask)
    params = dict(unwrap(model).named_parameters())
    missing = set(mask.masks) - set(params)
    if missing:
        raise ConfigError(f"invalid mask={cfg.mask!r}: names parameters the model does not have "
                          f"({sorted(missing)[:3]})")
    return [(params[n], m.to(params[n].device, params[n].dtype)) for n, m in mask.masks.items()]
