"""A Lightning callback for a LightningModule whose ``configure_optimizers`` returns DessiLBI.

    trainer = L.Trainer(max_epochs=10, callbacks=[DessiLBICallback()])

Logged every training epoch (``self.log``, so every Lightning logger gets them):
``dessilbi/density``, ``dessilbi/unit_density`` and, after validation,
``dessilbi/sparse_acc`` — the accuracy of ``W ⊙ 1[Γ ≠ 0]`` on the validation batches. Every
checkpoint Lightning saves carries the masks (``checkpoint["dessilbi_masks"]``: parameter name
→ bool mask), readable with :meth:`masks_from_checkpoint`.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from ..sparsity.masks import Mask
from .common import find_dessilbi, sparse_accuracy, structure_metrics

__all__ = ["DessiLBICallback", "masks_from_checkpoint"]

CHECKPOINT_KEY = "dessilbi_masks"


class DessiLBICallback(L.Callback):
    """Log the structure DessiLBI finds and save its masks with Lightning's checkpoints.

    Args:
        sparse_eval: also evaluate the Sparse model on the validation batches (one more pass
            over them per validation; classification accuracy from the logits' argmax).
    """

    def __init__(self, sparse_eval: bool = True) -> None:
        self.sparse_eval = sparse_eval

    def _optimizer(self, trainer: L.Trainer) -> Any:
        opt = find_dessilbi(trainer.optimizers)
        if opt is None:
            raise TypeError("DessiLBICallback: the LightningModule's configure_optimizers "
                            "returned no DessiLBI optimizer")
        return opt

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = structure_metrics(pl_module, self._optimizer(trainer))
        for key, value in metrics.items():
            pl_module.log(f"dessilbi/{key}", value)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.sparse_eval or trainer.sanity_checking or not trainer.optimizers:
            return
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        batches = (b for loader in loaders if loader is not None for b in loader)
        acc = sparse_accuracy(pl_module, self._optimizer(trainer), batches, pl_module.device)
        pl_module.log("dessilbi/sparse_acc", acc)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        opt = find_dessilbi(trainer.optimizers)
        if opt is not None:  # the format of a mask file (Mask.save)
            checkpoint[CHECKPOINT_KEY] = Mask.from_optimizer(pl_module, opt).state_dict()


def masks_from_checkpoint(checkpoint: dict[str, Any]) -> Mask:
    """The masks a :class:`DessiLBICallback` saved into a Lightning checkpoint (a loaded dict)."""
    return Mask.from_state_dict(checkpoint[CHECKPOINT_KEY])
