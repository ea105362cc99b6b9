"""A Hugging Face ``TrainerCallback`` for a Trainer given a DessiLBI optimizer.

    opt = DessiLBI(lbi_param_groups(model), lr=0.1, total_steps=steps)
    trainer = Trainer(model, args, train_dataset=..., eval_dataset=...,
                      optimizers=(opt, None), callbacks=[DessiLBITrainerCallback()])

At the end of every epoch it adds ``dessilbi/density`` and ``dessilbi/unit_density`` and, after
every evaluation, ``dessilbi/sparse_acc`` — the accuracy of ``W ⊙ 1[Γ ≠ 0]`` on the eval
batches — to ``state.log_history`` (kept in every checkpoint's ``trainer_state.json``), and
writes the masks beside every checkpoint the Trainer saves (``checkpoint-N/dessilbi_masks.pt``,
read with :meth:`dessilbi.sparsity.Mask.load`). The Trainer hands callbacks accelerate's
wrapper of the optimizer; it is unwrapped here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..sparsity.masks import Mask
from .common import find_dessilbi, sparse_accuracy, structure_metrics

__all__ = ["DessiLBITrainerCallback", "MASKS_FILE"]

MASKS_FILE = "dessilbi_masks.pt"


class DessiLBITrainerCallback(TrainerCallback):  # type: ignore[misc]
    """Log the structure DessiLBI finds and save its masks with the Trainer's checkpoints.

    Args:
        sparse_eval: evaluate the Sparse model on the eval batches every epoch (one more pass
            over them; classification accuracy from the logits' argmax).
    """

    def __init__(self, sparse_eval: bool = True) -> None:
        self.sparse_eval = sparse_eval
        self.history: list[dict[str, float]] = []

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     optimizer: Any = None, **_: Any) -> None:
        opt = find_dessilbi([optimizer])
        if opt is None or model is None:
            return
        entry: dict[str, float] = {f"dessilbi/{k}": v
                                   for k, v in structure_metrics(model, opt).items()}
        entry.update(epoch=float(state.epoch or 0.0), step=int(state.global_step))
        self.history.append(entry)
        state.log_history.append(entry)  # the same dict: on_evaluate completes it

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None,
                    optimizer: Any = None, eval_dataloader: Any = None, **_: Any) -> None:
        # The Trainer evaluates after on_epoch_end, and only then has an eval dataloader.
        opt = find_dessilbi([optimizer])
        if not self.sparse_eval or opt is None or model is None or eval_dataloader is None:
            return
        acc = sparse_accuracy(model, opt, eval_dataloader)
        if self.history and self.history[-1]["step"] == state.global_step:
            self.history[-1]["dessilbi/sparse_acc"] = acc
        else:
            entry = {"dessilbi/sparse_acc": acc, "epoch": float(state.epoch or 0.0),
                     "step": int(state.global_step)}
            self.history.append(entry)
            state.log_history.append(entry)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None,
                optimizer: Any = None, **_: Any) -> None:
        opt = find_dessilbi([optimizer])
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if opt is not None and model is not None and folder.is_dir():
            Mask.from_optimizer(model, opt).save(folder / MASKS_FILE)
