r"""Aim DessiLBI at a sparsity: one knob, the fraction of filters / neurons kept.

:class:`SparsityTarget` is stepped like a learning-rate scheduler (``target.step()`` after
``optimizer.step()``) and steers a :class:`~dessilbi.DessiLBI` optimizer so that, after
``select_at · total_steps`` steps, exactly the fraction ``density`` of the penalised *units*
(output filters of ``group`` layers, weights of ``lasso`` layers) is in supp(Γ):

1. **Path speed from the budget.** ν is set to ``α κ T_s / c`` (T_s the selection step,
   ``c = path_speed``), so the coupling ``(W − Γ)/ν`` has acted for ``c`` time constants by T_s
   whatever the number of steps. It pulls W only on the units outside supp(Γ) (``pull=
   "outside"``, the default; see :class:`~dessilbi.DessiLBI`'s ``pull``): the units in the
   support train as SGD-momentum, the others decay, while V ranks them all. The support starts
   with every unit and shrinks to the target (``schedule="shrink"``, the default), so nothing
   is pulled until it leaves the support and the network first trains as SGD would.
2. **Threshold from the target.** Every ``update_every`` steps the threshold λ of each penalised
   tensor is set so that the support holds the fraction :func:`support_fraction` of the units,
   ranked by the inverse-scale-space variable V (the order in which units enter Γ's support):
   a unit's score is its group norm ‖V_g‖ divided by the mean unit norm of its layer's initial
   weights, so one score means the same for layers of any size and scale, times
   (w̄ / w_l)^0.25 (``width_prior``: w_l the layer's units, w̄ their mean), so that a unit of a
   narrow layer, a larger share of its layer, ranks above an equal one of a wide layer.
   ``allocation="global"`` ranks the units of all layers together (each layer keeps at least
   ``min_units``); ``"layer"`` keeps the same fraction in every layer. With a MACs target
   (``macs``) the support holds the prefix of the global ranking (the scores alone, without
   the width prior or the reserve) whose pruned network costs closest to
   that fraction of the dense network's MACs (``cost``: :class:`dessilbi.structure.cost.MacsModel`).
3. **Select, then train the subnetwork.** At T_s (``freeze=True``) the support becomes a fixed
   mask: the coupling is released (ν = ∞, so V and Γ stop moving), the weights outside the mask
   (and the biases / norm parameters of dropped units given in ``coupled``) are set to zero and
   stay there, and the remaining budget trains the chosen subnetwork. With ``freeze=False`` the
   pure path runs on, λ holding the support at the target until the end.

The controller's own state (step, layer scales) is in :meth:`state_dict`; the thresholds, masks
and ν live in the optimizer's state and parameter groups, so ``optimizer.state_dict()`` carries
them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .optim import PULLS, DessiLBI, nu_for_steps, unwrap_optimizer
from .penalties import get_penalty
from .ranking import (
    SCORES,
    layer_scores,
    reserve_within,
    threshold_keeping,
    top_counts,
    units_within_cost,
    width_factors,
)
from .units import unit_counts

__all__ = ["SparsityTarget", "support_fraction", "unit_norms", "SCHEDULES", "ALLOCATIONS",
           "SCORES", "TARGET_PULLS", "group_pull", "layer_scores", "width_factors"]

SCHEDULES: tuple[str, ...] = ("grow", "shrink")
ALLOCATIONS: tuple[str, ...] = ("global", "layer")
CONV_OUTSIDE = "conv-outside"
# The optimizer's pulls, and "outside" on the groups of convolution filters only.
TARGET_PULLS: tuple[str, ...] = (*PULLS, CONV_OUTSIDE)


def group_pull(pull: str, penalised: Sequence[Tensor]) -> str:
    """The optimizer's ``pull`` for a group holding the ``penalised`` tensors under the target's
    ``pull``: ``"conv-outside"`` is ``"outside"`` on a group whose penalised tensors are all
    convolution filters (``ndim >= 3``) and ``"all"`` on any other group."""
    if pull != CONV_OUTSIDE:
        return pull
    return "outside" if penalised and all(p.ndim >= 3 for p in penalised) else "all"


def support_fraction(step: int, select_step: int, density: float, schedule: str = "grow",
                     start_step: int = 0) -> float:
    r"""Fraction of units the support should hold after ``step`` steps.

    With the progress p(t) = clip((t − T_0) / (T_s − T_0), 0, 1) (T_0 = ``start_step``, 0 by
    default), ``"grow"`` (the inverse scale space: the support starts empty and fills up)::

        s(t) = D · p(t)

    ``"shrink"`` (start from every unit, cubic decay as in gradual pruning)::

        s(t) = D + (1 − D) · (1 − p(t))³
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"invalid schedule={schedule!r}: choose one of {SCHEDULES}")
    progress = min(1.0, max(0, step - start_step) / max(select_step - start_step, 1))
    if schedule == "grow":
        return density * progress
    return density + (1.0 - density) * (1.0 - progress) ** 3


def unit_norms(v: Tensor, penalty: str, group_norm: str = "l2") -> Tensor:
    """The norm the proximal map thresholds, one value per unit (filter / neuron / weight)."""
    return get_penalty(penalty).unit_norms(v, group_norm)


def _check_arguments(density: float | None, macs: float | None, cost: object, total_steps: int,
                     select_at: float, path_speed: float, min_units: int, reserve: int,
                     schedule: str, score: str, width_prior: float,
                     allocation: str, pull: str | None, start_at: float,
                     settle: float, freeze: bool) -> None:
    """Raise ``ValueError`` naming the field for the first invalid argument of
    :class:`SparsityTarget`."""
    if (density is None) == (macs is None):
        raise ValueError("invalid target: give exactly one of density and macs")
    if macs is not None and cost is None:
        raise ValueError("invalid cost=None: a MACs target needs the network's cost model "
                         "(dessilbi.structure.cost.MacsModel.from_model)")
    if macs is not None and allocation != "global":
        raise ValueError(f"invalid allocation={allocation!r} with a MACs target: use "
                         "'global'")
    aim = ("density", density) if density is not None else ("macs", macs)
    checks = [
        (aim[0], aim[1], 0.0 < aim[1] <= 1.0, "must be in (0, 1]"),  # type: ignore[operator]
        ("total_steps", total_steps, isinstance(total_steps, int) and total_steps > 0,
         "must be a positive integer"),
        ("select_at", select_at, 0.0 < select_at <= 1.0, "must be in (0, 1]"),
        ("start_at", start_at, 0.0 <= start_at < select_at, "must be in [0, select_at)"),
        ("settle", settle, 0.0 <= settle <= 1.0 - select_at, "must be in [0, 1 - select_at]"),
        ("path_speed", path_speed, path_speed > 0.0, "must be > 0"),
        ("min_units", min_units, isinstance(min_units, int) and min_units >= 0,
         "must be an integer >= 0"),
        ("reserve", reserve, isinstance(reserve, int) and reserve >= 0,
         "must be an integer >= 0"),
        ("width_prior", width_prior, isinstance(width_prior, int | float)
         and 0.0 <= width_prior < math.inf, "must be a number >= 0"),
    ]
    for field, value, ok, why in checks:
        if isinstance(value, bool) or not ok:
            raise ValueError(f"invalid {field}={value!r}: {why}")
    if schedule not in SCHEDULES:
        raise ValueError(f"invalid schedule={schedule!r}: choose one of {SCHEDULES}")
    if score not in SCORES:
        raise ValueError(f"invalid score={score!r}: choose one of {SCORES}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"invalid allocation={allocation!r}: choose one of {ALLOCATIONS}")
    if settle and not freeze:
        raise ValueError(f"invalid settle={settle!r} with freeze=False: the ramp ends in the "
                         "fixed mask; the pure path has none")
    if pull is not None and pull not in TARGET_PULLS:
        raise ValueError(f"invalid pull={pull!r}: choose one of {TARGET_PULLS} or None")


class SparsityTarget:
    """Steer a :class:`~dessilbi.DessiLBI` run to a target fraction of units kept.

    Args:
        optimizer: the DessiLBI optimizer (its penalised parameters are steered).
        density: fraction of units (filters / neurons for ``group``, weights for ``lasso``) of
            the penalised layers to keep, in (0, 1]; ``None`` with ``macs``.
        total_steps: the optimizer steps of the whole run (epochs × batches per epoch).
        macs: instead of ``density``, the fraction of the dense network's MACs to keep: the
            prefix of the same global ranking whose ``cost`` is closest to it (``group``
            penalties only).
        cost: the MACs fraction after every prefix of a global order of the units, given
            each penalised tensor's ranks: :class:`dessilbi.structure.cost.MacsModel`.
        select_at: when the support reaches the target and (``freeze=True``) becomes fixed,
            as a fraction of ``total_steps`` (default 0.3: the chosen subnetwork then trains
            for the rest of the run, at the full learning rate first).
        freeze: fix the mask at selection and train the subnetwork for the rest of the run;
            ``False`` keeps the pure DessiLBI path (λ holds the support at the target).
        schedule: ``"shrink"`` (default: from every unit down to the target) or ``"grow"``
            (from none: the inverse scale space), see :func:`support_fraction`.
        allocation: ``"global"`` ranks units of all layers together by ‖V_g‖ over the layer's
            initial unit norm; ``"layer"`` keeps ``density`` of every layer.
        score: with global allocation, how a layer's ‖V_g‖ are put on the common scale
            (:func:`layer_scores`): ``"initial"`` (default) divides by the mean unit norm of
            the layer's initial weights, ``"mean"`` by the layer's current mean ‖V_g‖. On
            Conv-4 / Fashion-MNIST ``"mean"`` keeps more filters in the convolutions and
            scored 91.72 / 92.15 / 92.21 % against 91.56 / 92.13 / 91.98 % (seed 1 at 30 /
            50 % of units, seed 2 at 30 %); on
            LeNet-5 it starves the second convolution and lost 0.33 points on the mean of 18
            cells (docs/peers.md).
        width_prior: with global allocation and a units target, each layer's scores are
            multiplied by (w̄ / w_l)^width_prior (:func:`width_factors`; w_l the layer's
            units, w̄ their mean over the layers), so that the units of narrow layers, each
            a larger share of its layer, rank higher. Default 0.25 (since 2026-12-05),
            measured on the benchmark (docs/peers.md): level with the scores alone on the
            mean of LeNet-5's 18 cells (94.47 % both; OTO 94.41), ahead on each Conv-4 cell
            measured (seed 1 at 30 / 50 %, seed 2 at 30 % of units: 91.90 / 92.33 / 92.31 %
            against 91.56 / 92.13 / 91.98 %), for more compute: 0.37 / 0.67 / 0.47 of the
            dense MACs against 0.05 / 0.12 / 0.06, the convolutions nearly whole. A MACs
            target ranks by the scores alone. 0: the scores alone.
        min_units: with global allocation, no layer keeps fewer units than this.
        reserve: with global allocation and a units target, each layer's ``reserve`` best
            units (all of a layer with fewer) come first in the ranking, inside the target's
            count, and the rest of the count goes by score, so a narrow layer is not cut into
            a bottleneck; lowered so that the reserves take at most half the units kept
            (:func:`reserve_within`). Default 8, measured on LeNet-5 (docs/peers.md):
            without it the first convolution kept 2 of its 6 filters in 2 of 16 runs at 30 %
            of units (85.80 % against OTO's 89.05 %, 98.46 against 99.15 %); with it the
            three-seed means of the benchmark's 18 LeNet-5 cells are at or above OTO's in
            each (94.47 % on the mean against 94.41, the ranking alone 94.36). Conv-4 keeps
            15 or more units in every layer, where it changes nothing. 0: the ranking alone.
        nu: ``"auto"`` derives ν from the budget (``α κ T_s / path_speed``); a number sets it;
            ``None`` keeps the optimizer's ν.
        path_speed: time constants of the coupling that elapse by the selection step
            (default 1: a coupling that pulls W towards Γ more slowly leaves the network
            training as SGD would until the support is chosen; Conv-4 on Fashion-MNIST, 30 %
            of units: 89.22 % at 10 time constants, 90.88 % at 2, 91.36 % at 1, 91.38 %
            at 0.5; docs/peers.md).
        pull: set the optimizer's ``pull`` on the penalised groups: ``"outside"`` (default:
            the coupling decays only the units outside supp(Γ), those inside train as
            SGD-momentum), ``"conv-outside"`` (``"outside"`` on the groups of convolution
            filters, ``"all"`` on the others, :func:`group_pull`), ``"all"`` (the paper's
            iteration), ``None`` (keep the optimizer's). The defaults of ``pull``,
            ``schedule`` and ``select_at`` were chosen together, measured at full budgets
            on one thread (docs/peers.md): on Conv-4 / Fashion-MNIST they score 91.90 / 91.56
            / 92.13 / 92.35 % (seed 0 at 30 %, seed 1 at 30 / 50 / 70 % of units) where the
            former defaults (``"conv-outside"``, ``"grow"``, 0.5) scored 91.86 / 91.12 / 91.53
            / 90.95 %; on LeNet-5 they are 0.17 points below those on the mean of 12 cells,
            keeping fewer MACs in every cell (0.15 of the dense network's on the mean).
        update_every: steps between threshold updates (default: T_s / 200, at least 1).
        coupled: ``{weight: [tensors indexed by the same output units]}`` (the layer's bias, the
            following normalisation layer's weight and bias) zeroed with their dropped units;
            see :func:`dessilbi.structure.coupled_parameters`.
        whole: penalised weights whose units are all kept (grown in step with the target,
            counted in it; with global allocation), e.g. the layer that reads the input
            (:func:`dessilbi.core.units.stem_of`), which pruning methods often leave whole
            (OTO keeps all of Conv-4's 64 first-layer filters at 50 % of units). Measured level
            with the default ranking on LeNet-5 and Conv-4 (docs/peers.md), hence not the
            default.
        fade: at every threshold update before T_s, multiply the units outside supp(Γ) (and
            their ``coupled`` tensors) by (T_s − t) / (T_s − t_prev), so a unit left out from
            t₀ on holds (T_s − t) / (T_s − t₀) of its weights and the network is already the
            subnetwork when the mask is fixed (OTO HESSO's projection). Off by default: on
            four LeNet-5 / Fashion-MNIST cells it scored 0.10–1.31 points below (docs/peers.md).
        start_at: the support schedule starts at this fraction of the run (every unit kept
            before with ``"shrink"``, none with ``"grow"``), as OTO starts pruning at 10 %.
        settle: with ``freeze``, a fraction of the run after T_s over which the units outside
            the chosen support (and their ``coupled`` tensors) ramp down to zero before the
            mask is fixed at T_e = T_s + ``settle`` · ``total_steps``: the support is held
            and the coupling released at T_s, and after step t every dropped unit holds
            (T_e − t) / (T_e − T_s + 1) of the weights it would have, so the network passes
            from the whole one to the subnetwork without the jump of a sudden mask. 0 (the
            default) fixes the mask at T_s: on Conv-4 / Fashion-MNIST (seed 1, 30 % of
            units) ``settle=0.1`` scored 91.61 % against 91.56 % (docs/peers.md).
    """

    def __init__(
        self,
        optimizer: DessiLBI,
        density: float | None,
        total_steps: int,
        *,
        macs: float | None = None,
        cost: Callable[[list[Tensor]], Tensor] | None = None,
        select_at: float = 0.3,
        freeze: bool = True,
        schedule: str = "shrink",
        allocation: str = "global",
        score: str = "initial",
        width_prior: float = 0.25,
        min_units: int = 1,
        reserve: int = 8,
        nu: float | str | None = "auto",
        path_speed: float = 1.0,
        pull: str | None = "outside",
        update_every: int | None = None,
        coupled: Mapping[Tensor, Sequence[Tensor]] | None = None,
        whole: Sequence[Tensor] = (),
        fade: bool = False,
        start_at: float = 0.0,
        settle: float = 0.0,
    ) -> None:
        opt = unwrap_optimizer(optimizer)
        _check_arguments(density, macs, cost, total_steps, select_at, path_speed, min_units,
                         reserve, schedule, score, width_prior, allocation, pull, start_at,
                         settle, freeze)
        self.optimizer = opt
        self.params = opt.penalised_params()
        if not self.params:
            raise ValueError("invalid optimizer: it has no penalised (lasso / group) parameter")
        if macs is not None and any(opt.penalty_of(p) != "group" for p in self.params):
            raise ValueError("invalid penalty for a MACs target: only whole filters / neurons "
                             "(group) change the MACs; lasso layers do not")
        self.density, self.total_steps, self.freeze = density, total_steps, freeze
        self.macs, self.cost = macs, cost
        self.select_step = max(1, round(select_at * total_steps))
        self.start_step = round(start_at * total_steps)
        self.fix_step = self.select_step + round(settle * total_steps)
        self.schedule, self.allocation, self.min_units = schedule, allocation, min_units
        self.score, self.width_prior = score, width_prior
        self.reserve = reserve
        self.update_every = update_every or max(1, self.select_step // 200)
        self.coupled = {id(p): list(v) for p, v in (coupled or {}).items()}
        whole_ids = {id(p) for p in whole}
        if whole_ids - {id(p) for p in self.params}:
            raise ValueError("invalid whole: every layer kept whole must be a penalised "
                             "(lasso / group) parameter of the optimizer")
        if whole_ids and allocation != "global":
            raise ValueError(f"invalid allocation={allocation!r} with whole layers: use "
                             "'global'")
        self.whole = [id(p) in whole_ids for p in self.params]
        self.fade = fade
        self.step_count = 0
        self.frozen = False
        # Layer scale: mean unit norm of the initial weights (scores comparable across layers).
        self.scales = [float(unit_norms(p.detach(), opt.penalty_of(p)).float().mean())
                       or 1.0 for p in self.params]
        if nu == "auto":
            nu = self.auto_nu(path_speed)
        ids = {id(p) for p in self.params}
        for group in self._penalised_groups():
            if nu is not None:
                group["nu"] = float(nu)
            if pull is not None:
                group["pull"] = group_pull(pull, [p for p in group["params"] if id(p) in ids])
        self._set_thresholds(0.0)

    # ----------------------------------------------------------------- derived settings
    def auto_nu(self, path_speed: float) -> float:
        """ν = α κ T_s / c: the coupling's time constant ν / (α κ) is T_s / c steps."""
        group = self._penalised_groups()[0]
        return nu_for_steps(float(group["lr"]), self.select_step, group["kappa"], path_speed)

    def _penalised_groups(self) -> list[dict[str, Any]]:
        ids = {id(p) for p in self.params}
        return [g for g in self.optimizer.param_groups if any(id(p) in ids for p in g["params"])]

    # ----------------------------------------------------------------- the controller
    def target_now(self) -> float:
        """The fraction of units the support should hold at the current step."""
        aim = self.density if self.density is not None else self.macs
        return support_fraction(self.step_count, self.select_step, aim,  # type: ignore[arg-type]
                                self.schedule, self.start_step)

    def step(self) -> None:
        """Advance one optimizer step: update λ on schedule, fix the mask at selection (or
        ramp the dropped units down until ``settle`` ends)."""
        if self.frozen:
            return
        self.step_count += 1
        t = self.step_count
        selecting = t >= self.select_step
        if self.freeze and t > self.select_step:  # settling: the support is held
            self._settle_or_fix()
            return
        if selecting or t % self.update_every == 0:
            self._set_thresholds(self.target_now())
            if self.fade and not selecting:
                self._fade_outside()
        if selecting and self.freeze:
            self._release_coupling()
            self._settle_or_fix()

    def _settle_or_fix(self) -> None:
        """Scale the dropped units by (T_e − t) / (T_e − t + 1) before T_e, fix the mask at
        T_e (the ramp's last factor would be 0)."""
        t, t_e = self.step_count, self.fix_step
        if t >= t_e:
            self._fix_mask()
        else:
            self._scale_outside((t_e - t) / (t_e - t + 1))

    @torch.no_grad()
    def _set_thresholds(self, fraction: float) -> None:
        opt = self.optimizer
        norms = []
        for p in self.params:
            group = opt._group_of(p)
            v = opt.state[p].get("V")
            base = v if v is not None else torch.zeros_like(p)
            norms.append(unit_norms(base, opt.penalty_of(p), group["group_norm"]).float())
        keep = self._units_to_keep(norms, fraction)
        for p, n, k in zip(self.params, norms, keep):
            opt.state[p]["lambda_"] = threshold_keeping(n, k)

    def _units_to_keep(self, norms: list[Tensor], fraction: float) -> list[int]:
        sizes = [n.numel() for n in norms]
        if self.allocation == "layer":
            return [round(fraction * s) for s in sizes]
        # a MACs target ranks by cost too: the reserve and the width prior are the units
        # target's guards (a MACs target keeps the granularity of the scores alone)
        units_target = self.cost is None
        reserve = reserve_within(self.reserve, sizes, fraction) if units_target else 0
        scores = self._scores(norms, reserve, self.width_prior if units_target else 0.0)
        if units_target:
            k = round(fraction * scores.numel())
        else:
            k = units_within_cost(scores, sizes, self.cost, fraction)
        keep = top_counts(scores, sizes, k)
        if k == 0:
            return keep
        return [max(kp, min(self.min_units, s)) for kp, s in zip(keep, sizes)]

    def _scores(self, norms: list[Tensor], reserve: int, width_prior: float) -> Tensor:
        """The global ranking: :func:`layer_scores` (by default ‖V_g‖ over the layer's initial
        unit norm); the units of a ``whole`` layer come first, as many of them as the run's
        progress (all by selection), and so do each layer's ``reserve`` best units."""
        progress = 1.0 if self.schedule == "shrink" else support_fraction(
            self.step_count, self.select_step, 1.0, "grow", self.start_step)
        scores = []
        factors = width_factors([n.numel() for n in norms], width_prior)
        for n, s, whole, factor in zip(norms, self.scales, self.whole, factors):
            score = layer_scores(n, s, self.score) * factor
            if whole:
                first = torch.zeros(n.numel(), dtype=torch.bool, device=n.device)
                ranked = torch.argsort(n, descending=True, stable=True)
                first[ranked[:round(progress * n.numel())]] = True
                score = torch.where(first, math.inf, -math.inf)
            elif reserve:
                best = torch.argsort(n, descending=True, stable=True)[:reserve]
                score = score.clone()
                score[best] = math.inf
            scores.append(score)
        return torch.cat(scores)

    @torch.no_grad()
    def _fade_outside(self) -> None:
        """Scale the units outside supp(Γ) (and their ``coupled`` tensors) by
        (T_s − t) / (T_s − t_prev), t_prev the previous update: a unit that stays outside from
        step t₀ on is multiplied by (T_s − t) / (T_s − t₀), a ramp that reaches zero at T_s,
        so the network is already the subnetwork when the mask is fixed."""
        t, t_s = self.step_count, self.select_step
        self._scale_outside((t_s - t) / (t_s - max(0, t - self.update_every)))

    @torch.no_grad()
    def _scale_outside(self, factor: float) -> None:
        for p, shaped in self._unit_masks(kept=False):
            p.mul_(torch.where(shaped, factor, 1.0).to(p.dtype))

    def _release_coupling(self) -> None:
        for group in self._penalised_groups():
            group["nu"] = math.inf  # V and Γ stop: the support is the mask from now on

    @torch.no_grad()
    def _fix_mask(self) -> None:
        for p, shaped in self._unit_masks(kept=True):
            self.optimizer.set_mask(p, shaped)
        self._release_coupling()
        self.frozen = True

    def _unit_masks(self, kept: bool) -> list[tuple[Tensor, Tensor]]:
        """(tensor, bool mask broadcastable to it) for every penalised tensor and its
        ``coupled`` tensors: the units in supp(Γ) (``kept``) or those outside it."""
        opt, pairs = self.optimizer, []
        for p in self.params:
            penalty = get_penalty(opt.penalty_of(p))
            units = penalty.unit_mask(opt.support(p))
            units = units if kept else ~units
            pairs.append((p, penalty.unit_shaped(units, p.shape)))
            for q in self.coupled.get(id(p), []):
                if q.ndim >= 1 and q.shape[0] == units.numel():
                    pairs.append((q, units.reshape((-1,) + (1,) * (q.ndim - 1))))
        return pairs

    # ----------------------------------------------------------------- checkpointing
    def unit_density(self) -> float:
        """Fraction of the penalised units now in supp(Γ)."""
        counts = [unit_counts(self.optimizer.support(p), self.optimizer.penalty_of(p))
                  for p in self.params]
        return sum(k for k, _ in counts) / sum(n for _, n in counts)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "frozen": self.frozen, "scales": list(self.scales)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.frozen = bool(state["frozen"])
        self.scales = [float(s) for s in state["scales"]]
