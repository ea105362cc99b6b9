"""The training engine: (model, optimizer, data, schedule) → a run folder that is never lost.

After every epoch it measures the test accuracy of the Full model (W) and of the Sparse model
(W ⊙ 1[Γ ≠ 0], restored exactly afterwards), the train loss, lr, overall and per-layer density and
the epoch at which each filter / weight first entered the support, and writes:

    runs/<name>/config.yaml      the resolved configuration
    runs/<name>/metrics.jsonl    one JSON line per epoch
    runs/<name>/tb/              TensorBoard scalars
    runs/<name>/init.pt          the initial weights (for lottery tickets)
    runs/<name>/checkpoint.pt    the latest state (+ checkpoint.pt.prev), written atomically
    runs/<name>/path.pt          ‖Γ_g‖, ‖W_g‖ per filter / neuron over epochs
    runs/<name>/masks.pt         the final Γ-support masks and entry epochs
    runs/<name>/summary.json     final accuracies and per-layer density

``--resume`` continues bit-for-bit on CPU: model, optimizer (V, momentum), scheduler, RNG states
and data order (a per-epoch permutation derived from the seed) are restored, mid-epoch too after
Ctrl-C. A NaN / Inf loss raises :class:`NonFiniteLossError` and leaves the last good checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..core.optim import DessiLBI
from ..core.optimizers import create_optimizer
from ..core.target import SparsityTarget
from ..core.units import coupled_parameters, unit_density
from ..files import load_checkpoint, save_checkpoint
from ..sparsity.masks import (
    EntryTracker,
    Mask,
    PathRecorder,
    applied_masks,
    layer_report,
    named_masks,
    named_penalties,
    unwrap,
)
from ..structure.prune import prune_model
from ..zoo.data import DataInfo, TensorImageDataset, load_dataset
from ..zoo.models import create_model
from .checkpoint import rng_state, set_rng_state
from .config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

__all__ = ["train", "evaluate", "NonFiniteLossError", "RunExistsError", "epoch_indices",
           "Dist", "build"]

CHECKPOINT = "checkpoint.pt"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


class RunExistsError(RuntimeError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


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


def epoch_indices(n: int, seed: int, epoch: int, shuffle: bool = True, rank: int = 0,
                  world: int = 1) -> Tensor:
    """The sample order of ``epoch``: a permutation fixed by (seed, epoch), sharded by rank.

    Depending only on (seed, epoch) is what lets a resumed run see the same batches.
    """
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        idx = torch.randperm(n, generator=g)
    else:
        idx = torch.arange(n)
    if world > 1:
        per = n // world  # drop the tail so every rank takes the same number of steps
        idx = idx[: per * world].view(per, world)[:, rank]
    return idx


def _batches(dataset: Dataset, indices: Tensor, batch_size: int, workers: int,
             pin: bool) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(dataset, TensorImageDataset) and workers == 0:
        # In-memory data: index whole batches at once instead of collating samples.
        mean, std = dataset.mean, dataset.std
        for start in range(0, len(indices), batch_size):
            idx = indices[start:start + batch_size]
            x = dataset.images[idx].float().div_(255.0)
            if dataset.augment is not None:
                x = torch.stack([dataset.augment(xi) for xi in x])
            x, y = (x - mean) / std, dataset.labels[idx]
            if pin:  # page-locked, so the copy to the GPU can be non-blocking
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y
        return
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices.tolist(),
                        num_workers=workers, pin_memory=pin, persistent_workers=False)
    yield from loader


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512,
             amp_dtype: torch.dtype | None = None, workers: int = 0) -> float:
    """Top-1 accuracy (%) of ``model`` on ``dataset``."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for x, y in _batches(dataset, torch.arange(len(dataset)), batch_size, workers,  # type: ignore[arg-type]
                         device.type == "cuda"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        correct += (out.argmax(1) == y).sum()
        seen += y.numel()
    model.train(was_training)
    return 100.0 * float(correct) / max(seen, 1)


def _device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"invalid device={name!r}: CUDA is not available here")
    return dev


def _scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer) -> Any:
    from torch.optim import lr_scheduler as ls

    if cfg.schedule == "multistep":
        return ls.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.lr_gamma)
    if cfg.schedule == "cosine":
        return ls.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return ls.StepLR(opt, step_size=cfg.step_size, gamma=cfg.lr_gamma)
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
    model = create_model(cfg.model, info.num_classes, info.in_channels, info.image_size,
                         width=cfg.width)
    if cfg.init_from:
        state = load_checkpoint(cfg.init_from)
        model.load_state_dict(state.get("model", state))
    if cfg.mask:
        Mask.load(cfg.mask).apply_(model)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    example = _example(test_set, device)
    steps = cfg.epochs * _batches_per_epoch(cfg, len(train_set), d)  # type: ignore[arg-type]
    opt = create_optimizer(cfg.optimizer_config(), model, example, total_steps=steps)
    target = None
    if cfg.target_density is not None and isinstance(opt, DessiLBI):
        target = SparsityTarget(opt, cfg.target_density, steps, select_at=cfg.select_at,
                                freeze=cfg.freeze, coupled=coupled_parameters(model, example))
    return Built(cfg, model, opt, _scheduler(cfg, opt), train_set, test_set, info, device, note,
                 example, target)


def _example(dataset: Dataset, device: torch.device) -> Tensor:
    """One input, batched: enough to trace the model's graph."""
    return dataset[0][0].unsqueeze(0).to(device)


def _batches_per_epoch(cfg: TrainConfig, n_train: int, d: Dist) -> int:
    per_rank = n_train // d.world if d.world > 1 else n_train
    n = math.ceil(per_rank / max(cfg.batch_size // d.world, 1))
    return min(n, cfg.max_train_batches) if cfg.max_train_batches else n


def _fixed_mask(cfg: TrainConfig, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
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


def finished_summary(run_dir: Path, epochs: int) -> dict[str, Any] | None:
    """The summary of a run that has trained ``epochs`` epochs (or more), or None: absent,
    partial, unreadable, or shorter (resuming it with more epochs extends it)."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not summary.get("final"):
        return None
    done = summary["final"].get("epoch", summary.get("config", {}).get("epochs", 0))
    return summary if isinstance(done, int) and done >= epochs else None


def _write_json_line(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def _truncate_metrics(path: Path, upto_epoch: int) -> None:
    """Drop metric lines of epochs after the checkpoint (written before a crash)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("epoch", 0) <= upto_epoch]
    path.write_text("".join(ln + "\n" for ln in keep))


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg``; returns the run summary (also in ``summary.json``)."""
    d = Dist.from_env()
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    cfg = cfg.validate().resolved()[0]
    run_dir = cfg.run_dir()
    ckpt_path = run_dir / CHECKPOINT
    if resume and (done := finished_summary(run_dir, cfg.epochs)) is not None:
        return done  # a finished run is read back, never rewritten
    b = build(cfg, d)
    model, opt, sched, device = b.model, b.optimizer, b.scheduler, b.device
    if d.main and (run_dir / "summary.json").exists() and not resume and not overwrite:
        raise RunExistsError(f"run {run_dir} already finished; pass --resume to reuse it or "
                             "--overwrite to train it again")
    if d.main and ckpt_path.exists() and not resume and not overwrite:
        raise RunExistsError(f"run {run_dir} has a checkpoint; pass --resume to continue it or "
                             "--overwrite to start again")
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            for f in ("metrics.jsonl", "summary.json", CHECKPOINT, CHECKPOINT + ".prev",
                      "path.pt", "masks.pt"):
                (run_dir / f).unlink(missing_ok=True)
        import yaml

        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if not (run_dir / "init.pt").exists():
            save_checkpoint({"model": unwrap(model).state_dict()}, run_dir / "init.pt")
    if b.dataset_note and d.main:
        log.info(b.dataset_note)

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    if amp_dtype is not None and device.type != "cuda":
        amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else None
        if amp_dtype is None:
            log.warning("fp16 AMP needs CUDA; training in fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16" and device.type == "cuda")

    lbi = opt if isinstance(opt, DessiLBI) else None
    fixed = _fixed_mask(cfg, model)
    penalties = named_penalties(model, lbi) if lbi else {}
    entry, path_rec = EntryTracker(), PathRecorder()
    start_epoch, start_batch = 0, 0
    accum = {"loss": 0.0, "correct": 0, "seen": 0}
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, map_location=device)
        unwrap(model).load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        start_epoch, start_batch = int(ck["epoch"]), int(ck["batch"])
        accum = dict(ck.get("accum", accum))
        entry = EntryTracker(ck.get("entry"))
        if b.target is not None and ck.get("target"):
            b.target.load_state_dict(ck["target"])
        if (run_dir / "path.pt").exists():
            path_rec = PathRecorder(load_checkpoint(run_dir / "path.pt"))
            keep = [i for i, e in enumerate(path_rec.epochs) if e <= start_epoch]
            path_rec.epochs = [path_rec.epochs[i] for i in keep]
            for store in (path_rec.gamma, path_rec.weight):
                for k in store:
                    store[k] = [store[k][i] for i in keep]
        if d.main:
            _truncate_metrics(run_dir / "metrics.jsonl", start_epoch)
            log.info("resumed %s at epoch %d, batch %d", run_dir, start_epoch, start_batch)
    elif resume and d.main:
        log.info("no checkpoint in %s: starting from scratch", run_dir)

    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    writer = None
    if cfg.tensorboard and d.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))

    def checkpoint(epoch: int, batch: int) -> None:
        if not d.main:
            return
        save_checkpoint({
            "format": "dessilbi-checkpoint-v1", "config": cfg.to_dict(), "epoch": epoch,
            "batch": batch, "model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": rng_state(), "accum": accum, "entry": entry.state_dict(),
            "target": b.target.state_dict() if b.target is not None else None,
        }, ckpt_path)

    from tqdm.auto import tqdm

    n_train = len(b.train_set)  # type: ignore[arg-type]
    per_rank_batch = max(cfg.batch_size // d.world, 1)
    metrics: dict[str, Any] = {}
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            idx = epoch_indices(n_train, cfg.seed, epoch, True, d.rank, d.world)
            n_batches = math.ceil(len(idx) / per_rank_batch)
            if cfg.max_train_batches:
                n_batches = min(n_batches, cfg.max_train_batches)
                idx = idx[: n_batches * per_rank_batch]
            first = start_batch if epoch == start_epoch else 0
            if first == 0:
                accum = {"loss": 0.0, "correct": 0, "seen": 0}
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)
            seen = 0
            model.train()
            bar = tqdm(total=n_batches, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (cfg.progress and d.main), leave=False, dynamic_ncols=True)
            batch_i = first
            try:
                for x, y in _batches(b.train_set, idx[first * per_rank_batch:], per_rank_batch,
                                     cfg.workers, device.type == "cuda"):
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    if cfg.channels_last:
                        x = x.to(memory_format=torch.channels_last)
                    with torch.autocast(device.type, dtype=amp_dtype,
                                        enabled=amp_dtype is not None):
                        out = model(x)
                        loss = nn.functional.cross_entropy(out, y)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if fixed:
                        for p, m in fixed:  # pruned weights get no gradient...
                            if p.grad is not None:
                                p.grad.mul_(m)
                    scaler.step(opt)
                    scaler.update()
                    if b.target is not None:
                        b.target.step()
                    if fixed:
                        with torch.no_grad():
                            for p, m in fixed:  # ...and stay exactly zero (weight decay aside)
                                p.mul_(m)
                    ld = loss.detach()
                    nonfinite |= ~torch.isfinite(ld)
                    loss_sum += ld * y.numel()
                    correct += (out.detach().argmax(1) == y).sum()
                    seen += y.numel()
                    batch_i += 1
                    bar.update(1)
                    if batch_i % cfg.log_every == 0 or batch_i == n_batches:
                        if bool(nonfinite):  # the only host sync, every log_every steps
                            raise NonFiniteLossError(
                                f"loss became NaN/Inf in epoch {epoch + 1} before batch "
                                f"{batch_i}; the last good checkpoint is {ckpt_path} "
                                "(try a smaller lr)")
                        post = {"loss": f"{float(loss_sum) / seen:.3f}",
                                "acc": f"{100.0 * float(correct) / seen:.1f}"}
                        if "density" in metrics:  # the support as of the last epoch
                            post["density"] = f"{100 * metrics['density']:.2f}%"
                        bar.set_postfix(post)
            except KeyboardInterrupt:
                bar.close()
                accum = {"loss": accum["loss"] + float(loss_sum),
                         "correct": accum["correct"] + int(correct),
                         "seen": accum["seen"] + seen}
                if not bool(nonfinite):
                    checkpoint(epoch, batch_i)
                    log.warning("interrupted: saved %s at epoch %d, batch %d; continue with "
                                "--resume", ckpt_path, epoch, batch_i)
                raise
            bar.close()
            if bool(nonfinite):
                raise NonFiniteLossError(f"loss became NaN/Inf in epoch {epoch + 1}; the last "
                                         f"good checkpoint is {ckpt_path}")
            accum = {"loss": accum["loss"] + float(loss_sum),
                     "correct": accum["correct"] + int(correct), "seen": accum["seen"] + seen}
            lr_now = opt.param_groups[0]["lr"]
            sched.step()
            metrics = _epoch_metrics(epoch + 1, model, lbi, b, amp_dtype, accum, lr_now,
                                     time.perf_counter() - t0, penalties, entry, cfg)
            if lbi is not None and cfg.path_every and (epoch + 1) % cfg.path_every == 0:
                path_rec.record(epoch + 1, model, lbi)
            accum = {"loss": 0.0, "correct": 0, "seen": 0}
            if d.main:
                _write_json_line(run_dir / "metrics.jsonl", metrics)
                if writer is not None:
                    _tensorboard(writer, metrics)
                if lbi is not None:
                    save_checkpoint(path_rec.state_dict(), run_dir / "path.pt")
                checkpoint(epoch + 1, 0)
                log.info(_metrics_line(metrics))
    finally:
        if writer is not None:
            writer.close()

    summary = _summary(cfg, b, metrics, run_dir)
    if d.main:
        if lbi is not None:
            save_checkpoint({"masks": {k: v.cpu() for k, v in named_masks(model, lbi).items()},
                             "penalties": penalties, "entry": dict(entry.entry),
                             "history": entry.state_dict(),
                             "epoch": cfg.epochs}, run_dir / "masks.pt")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _epoch_metrics(epoch: int, model: nn.Module, lbi: DessiLBI | None, b: Built,
                   amp_dtype: torch.dtype | None, accum: dict[str, Any], lr: float,
                   seconds: float, penalties: dict[str, str], entry: EntryTracker,
                   cfg: TrainConfig) -> dict[str, Any]:
    m: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": accum["loss"] / max(accum["seen"], 1),
        "train_acc": 100.0 * accum["correct"] / max(accum["seen"], 1),
        "lr": lr,
        "epoch_time": seconds,
        "full_acc": evaluate(model, b.test_set, b.device, amp_dtype=amp_dtype,
                             workers=cfg.workers),
    }
    if lbi is not None:
        masks = named_masks(model, lbi)
        with applied_masks(model, masks):
            m["sparse_acc"] = evaluate(model, b.test_set, b.device, amp_dtype=amp_dtype,
                                       workers=cfg.workers)
        report = layer_report(masks, penalties)
        m["density"] = report.pop("(all)")["density"]
        m["unit_density"] = unit_density(masks, penalties)
        m.update(_pruned_cost(model, Mask(masks, penalties), b.example))
        m["layers"] = report
        entry.update(epoch, masks, penalties)
    return m


def _pruned_cost(model: nn.Module, mask: Mask, example: Tensor) -> dict[str, float]:
    """MACs and parameters of the network with the support's units removed, over the dense."""
    pruned = prune_model(model, mask, example)
    return {"macs_ratio": pruned.macs_after / max(pruned.macs_before, 1),
            "params_ratio": pruned.params_after / max(pruned.params_before, 1)}


def _tensorboard(writer: Any, m: dict[str, Any]) -> None:
    e = m["epoch"]
    for k in ("train_loss", "train_acc", "lr", "full_acc", "sparse_acc", "density",
              "unit_density", "macs_ratio", "params_ratio", "epoch_time"):
        if k in m:
            writer.add_scalar(k, m[k], e)
    for name, row in m.get("layers", {}).items():
        writer.add_scalar(f"density/{name}", row["density"], e)
    writer.flush()


def _metrics_line(m: dict[str, Any]) -> str:
    s = (f"epoch {m['epoch']}: loss {m['train_loss']:.4f}, full {m['full_acc']:.2f}%")
    if "sparse_acc" in m:
        s += (f", sparse {m['sparse_acc']:.2f}%, density {100 * m['density']:.2f}%, units "
              f"{100 * m['unit_density']:.1f}%, MACs {100 * m['macs_ratio']:.1f}%")
    return s + f", {m['epoch_time']:.1f}s"


def _summary(cfg: TrainConfig, b: Built, last: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    return {
        "run": str(run_dir),
        "config": cfg.to_dict(),
        "dataset": cfg.dataset,
        "dataset_source": b.info.source,
        "epochs": cfg.epochs,
        "final": last,
        "torch": torch.__version__,
        "device": str(b.device),
    }
