"""The optimizers of the paper's Table 1, built from a model by name.

``create_optimizer(name, model, ...)`` returns DessiLBI or one of the baselines: ``sgd``,
``sgd-momentum``, ``sgd-momentum-wd``, ``nesterov``, ``adam``, ``adamw``, ``adagrad``,
``amsgrad``, ``radam``, ``adabound``. Parameter groups come from module types
(:func:`dessilbi.lbi_param_groups`), so biases and normalisation layers get no weight decay
for every optimizer alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .optim import DessiLBI
from .optimizer_config import OptimizerConfig
from .param_groups import lbi_param_groups

__all__ = ["AdaBound", "OPTIMIZERS", "OptimizerConfig", "create_optimizer"]

OPTIMIZERS = (
    "dessilbi", "sgd", "sgd-momentum", "sgd-momentum-wd", "nesterov", "adam", "adamw",
    "adagrad", "amsgrad", "radam", "adabound",
)


class AdaBound(Optimizer):
    r"""AdaBound (Luo, Xiong, Liu, Sun, ICLR 2019): Adam with a step size clipped into bounds that
    converge to SGD's.

    With bias-corrected step :math:`\eta_t = \alpha \sqrt{1-\beta_2^t} / (1-\beta_1^t)` and final
    learning rate :math:`\alpha^\*` (``final_lr`` scaled by the current lr over the initial one):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \eta_l = \alpha^\* (1 - 1/(\gamma t + 1)), \quad \eta_u = \alpha^\* (1 + 1/(\gamma t)) \\
        W_t = W_{t-1} - \operatorname{clip}(\eta_t / (\sqrt{v_t} + \epsilon), \eta_l, \eta_u)\, m_t
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 final_lr: float = 0.1, gamma: float = 1e-3, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        for fld, v, ok in (("lr", lr, lr >= 0), ("final_lr", final_lr, final_lr >= 0),
                           ("gamma", gamma, 0 <= gamma < 1), ("eps", eps, eps >= 0),
                           ("betas", betas, all(0 <= b < 1 for b in betas)),
                           ("weight_decay", weight_decay, weight_decay >= 0)):
            if not ok:
                raise ValueError(f"invalid {fld}={v!r}")
        super().__init__(params, dict(lr=lr, betas=betas, final_lr=final_lr, gamma=gamma,
                                      eps=eps, weight_decay=weight_decay))
        self.base_lrs = [g["lr"] for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, base_lr in zip(self.param_groups, self.base_lrs):
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
                final_lr = group["final_lr"] * group["lr"] / base_lr
                lower = final_lr * (1 - 1 / (group["gamma"] * t + 1))
                upper = final_lr * (1 + 1 / (group["gamma"] * t))
                rate = torch.full_like(v, step_size).div_(v.sqrt().add_(group["eps"]))
                p.sub_(rate.clamp_(lower, upper).mul_(m))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.base_lrs = state_dict.get("base_lrs", self.base_lrs)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["base_lrs"] = list(self.base_lrs)
        return sd


def create_optimizer(cfg: OptimizerConfig, model: nn.Module, example_inputs: Any = None,
                     total_steps: int | None = None) -> Optimizer:
    """Build the optimizer ``cfg.name`` for ``model``'s parameters.

    ``example_inputs`` (an input batch) lets DessiLBI find the classifier from a forward pass;
    ``total_steps`` (the run's number of optimizer steps) sets DessiLBI's ν when ``cfg.nu`` is
    None.
    """
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if cfg.name == "dessilbi":
        conv_options: dict[str, Any] = {"group_norm": cfg.group_norm}
        if cfg.lambda_conv is not None:
            conv_options["lambda_"] = cfg.lambda_conv
        groups = lbi_param_groups(
            model, conv_penalty=cfg.conv_penalty, linear_penalty=cfg.linear_penalty,
            weight_decay=cfg.weight_decay, exclude=cfg.exclude, conv_options=conv_options,
            keep_classifier=cfg.keep_classifier, example_inputs=example_inputs,
        )
        return DessiLBI(groups, lr=cfg.lr, kappa=cfg.kappa, nu=cfg.nu, lambda_=cfg.lambda_,
                        momentum=cfg.momentum, nesterov=cfg.nesterov,
                        fused=True if cfg.fused else None,  # off: DessiLBI's own choice
                        total_steps=total_steps)
    wd = cfg.weight_decay
    if cfg.name == "sgd-momentum-wd" and wd == 0.0:
        wd = 1e-4  # the name promises weight decay: use the paper's value unless one is given
    groups = [{"params": g["params"], "weight_decay": wd if g["weight_decay"] else 0.0}
              for g in lbi_param_groups(model, weight_decay=1.0)]
    lr = cfg.lr
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if cfg.name in ("sgd-momentum", "sgd-momentum-wd"):
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "nesterov":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if cfg.name == "amsgrad":
        return torch.optim.Adam(groups, lr=lr, amsgrad=True)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr)
    if cfg.name == "radam":
        return torch.optim.RAdam(groups, lr=lr)
    return AdaBound(groups, lr=lr, final_lr=cfg.final_lr)
