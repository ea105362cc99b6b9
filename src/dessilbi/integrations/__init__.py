"""DessiLBI inside the frameworks people train with.

* :class:`dessilbi.integrations.lightning.DessiLBICallback` — a Lightning ``Callback``
  (extra ``[lightning]``);
* :class:`dessilbi.integrations.hf.DessiLBITrainerCallback` — a Hugging Face
  ``TrainerCallback`` (extra ``[hf]``).

Both log, per epoch, the density of supp(Γ), the fraction of filters / neurons kept and the
Sparse model's accuracy (``W ⊙ 1[Γ ≠ 0]``, no fine-tuning), and save the masks with the
framework's checkpoints. The framework is imported only by its own module.
"""

from .common import sparse_accuracy, structure_metrics

__all__ = ["sparse_accuracy", "structure_metrics"]
