"""The optimizer's section of a configuration (torch-free, so the command line parses without
importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OptimizerConfig"]


@dataclass(frozen=True)
class OptimizerConfig:
    """Hyper-parameters shared by the optimizers (each takes the ones it has).

    The one optimizer configuration of the project: ``dessilbi.core.optimizers.create_optimizer``
    reads it, and a training run's :class:`dessilbi.training.config.TrainConfig` holds it as its
    ``optim`` section (its ``name`` is the ``optimizer`` key of a config file and the
    ``--optimizer`` flag).
    """

    name: str = "dessilbi"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    kappa: float = 1.0
    nu: float | None = None  # None: from total_steps (nu_for_steps), else 100
    lambda_: float = 1.0
    lambda_conv: float | None = None
    group_norm: str = "l2"
    conv_penalty: str = "group"
    linear_penalty: str = "group"  # one group per output neuron: removable neurons
    keep_classifier: bool = True  # the layer producing the outputs gets no penalty
    exclude: list[str] = field(default_factory=list)
    fused: bool = False
    final_lr: float = 0.1  # AdaBound
