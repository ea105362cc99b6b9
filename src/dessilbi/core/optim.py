r"""The DessiLBI optimizer (Deep structurally splitting Linearized Bregman Iteration).

DessiLBI couples every penalised weight tensor W with a sparse variable Γ through the loss

.. math::
    \bar L(W, Γ) = L(W) + \frac{1}{2ν} \lVert W - Γ \rVert^2

and runs, with learning rate α, a linearised Bregman iteration on Γ whose path Γ(t) is an inverse
scale space: Γ starts at 0 and the most important weights (or whole filters) enter its support
first. One step, per parameter W with gradient g (right-hand sides use values before the step):

.. math::
    g &\leftarrow g + \text{wd}\, W \\
    b &\leftarrow m\, b + (1 - \text{dampening})\, g
        \quad (b \leftarrow g \text{ on the first step}) \\
    d &\leftarrow g + m\, b \text{ (Nesterov)} \quad\text{else}\quad d \leftarrow b \\
    W &\leftarrow W - ακ\, d - \frac{ακ}{ν} (W - Γ) \odot P \\
    V &\leftarrow V + \frac{α}{ν} (W - Γ) \\
    Γ &\leftarrow κ \operatorname{prox}_λ(V)

Parameters with ``penalty="none"`` take the plain step ``W ← W − ακ d`` (the factor κ follows the
authors' reference implementation). The coupling term never enters the momentum buffer.

P says on which units the coupling pulls W (``pull``): ``"all"`` (P = 1, the paper's iteration)
or ``"outside"`` (P = 1[Γ_g = 0] per filter / neuron, per weight for ``lasso``): there Γ is 0 and
the pull is the decay (ακ/ν) W, while the units in supp(Γ) train as SGD-momentum would. V and Γ
follow the same path equations either way.

The optimizer state of a penalised parameter is V (``state["V"]``) and the momentum buffer;
Γ = κ prox_λ(V) is recomputed when needed, so the state costs at most 2× the parameter bytes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .bundle import Bundle
from .checks import PULLS, check_grad, check_group, check_params
from .flat_plan import plan_buckets, step_buckets
from .penalties import prox
from .steady import SteadyStep
from .update import dessilbi_update

__all__ = ["DessiLBI", "nu_for_steps", "resolve_penalty", "unwrap_optimizer", "PENALTY_CHOICES",
           "PULLS"]

PENALTY_CHOICES: tuple[str, ...] = ("auto", "lasso", "group", "none")  # built in: PENALTIES


DEFAULT_NU = 100.0  # the paper's ν, for runs whose length the optimizer is not told
PATH_SPEED = 20.0  # time constants of the coupling per run: measured in docs/training.md
MIN_TIME_CONSTANT = 10.0  # steps: the coupling pulls W at most 1/10 of the way to Γ a step
MIN_NU = 5.0  # below it no unit enters the support before the coupling empties the network
# entries of a group's large CPU tensors from which ``fused=None`` compiles them: their eager
# step then costs more per step than SGD's by milliseconds (VGG16-BN, 14.7 M: 23 ms against
# 12 ms; compiled 14 ms), which repays the 10-20 s of compilation within a few thousand steps
AUTO_COMPILE_NUMEL = 1 << 22


def nu_for_steps(lr: float, total_steps: int, kappa: float = 1.0,
                 path_speed: float = PATH_SPEED) -> float:
    r"""ν for a run of ``total_steps`` optimizer steps:
    :math:`\nu = \max(\alpha\kappa \max(T / c, 10),\ 5)`.

    V moves by :math:`(\alpha/\nu)(W - \Gamma)` a step, so the coupling's time constant is
    :math:`\nu / (\alpha\kappa)` steps; this ν makes the run last ``c = path_speed`` of them.
    With c = 20 (measured on LeNet-3 / LeNet-5, 3 to 20 epochs: docs/training.md) the support has
    filled in well before the end and the Sparse model ends within a point of the Full one;
    c ≲ 2 leaves the path unfinished (Sparse far below Full), c ≳ 200 couples so hard that the
    Full model loses accuracy. The floor of 10 time-constant steps keeps the pull of W towards Γ,
    (ακ/ν)(W − Γ), at most a tenth of the gap a step in very short runs (smoke tests), where a
    larger pull makes W overshoot and diverge.

    The floor ν ≥ 5 keeps units able to enter at all: while Γ is 0 the coupling holds W near
    ν g, and a unit enters only once V, which grows like W, passes λ; with ν ≈ 1 no unit of a
    network of usual scale gets there, every weight is pulled to 0 and the network dies (a
    small CNN on the 8×8 digits, 450 steps at lr 0.05: ν = 1.1 ends at 10 % accuracy with an
    empty support, ν = 5 at 91 % with 63 % of the weights; the plain-loop tutorial).
    """
    if total_steps < 1:
        raise ValueError(f"invalid total_steps={total_steps!r}: must be a positive integer")
    return max(float(lr) * kappa * max(total_steps / path_speed, MIN_TIME_CONSTANT), MIN_NU)


def resolve_penalty(penalty: str, param: Tensor) -> str:
    """The concrete penalty of ``param`` in a group whose penalty is ``penalty``.

    ``"auto"`` is for parameters handed over without module information (``model.parameters()``):
    tensors with ≥ 2 dimensions (convolution kernels, linear weights) get ``"group"`` (one group
    per output filter / neuron, so the support removes whole units) and vectors / scalars
    ``"none"``. :func:`dessilbi.lbi_param_groups` decides from module types
    instead and should be preferred.
    """
    if penalty != "auto":
        return penalty
    if param.ndim >= 2:
        return "group"
    return "none"


class DessiLBI(Optimizer):
    r"""DessiLBI as a drop-in :class:`torch.optim.Optimizer`.

    Args:
        params: parameters or parameter groups, best built with
            :func:`dessilbi.lbi_param_groups` (penalties chosen from module types).
        lr: learning rate α.
        kappa: κ, the damping of the inverse scale space; every step is scaled by κ (default 1).
        nu: ν, the coupling strength of ``‖W − Γ‖² / (2ν)``; larger ν means a slower path
            (``math.inf`` turns DessiLBI into SGD with learning rate α κ). Default: chosen from
            ``total_steps`` by :func:`nu_for_steps` (ν = α κ T / 20), else 100.
        lambda_: λ, the threshold of the proximal map (default 1).
        penalty: ``"lasso"`` (element-wise), ``"group"`` (one group per output filter / neuron),
            ``"none"`` (plain SGD-momentum) or ``"auto"`` (decided per tensor from its number of
            dimensions, see :func:`resolve_penalty`).
        group_norm: ``"l2"`` thresholds ‖V_g‖₂, ``"rms"`` thresholds ‖V_g‖₂ / √n_g.
        momentum: momentum factor m in [0, 1) (default 0.9).
        dampening: dampening of the momentum (default 0).
        nesterov: Nesterov momentum (default False).
        weight_decay: L2 penalty added to the gradient (default 0).
        pull: the units on which the coupling pulls W towards Γ: ``"all"`` (default, the
            paper's iteration) or ``"outside"`` (only units outside supp(Γ), which it decays by
            (ακ/ν) W a step; units in the support train as SGD-momentum). V and Γ are the same
            path either way. Aimed with :class:`~dessilbi.SparsityTarget`, Conv-4 on
            Fashion-MNIST at 50 % of units: 92.55 % against 92.02 %; LeNet-5: lower in 9 of
            12 cells (docs/peers.md).
        maximize: maximise the objective (the step uses −g), as in ``torch.optim``.
        foreach: ``True``: the multi-tensor (``torch._foreach_*``) kernels; ``False``: the
            per-tensor loop; ``None`` (default): flat buckets on the CPU and CUDA
            (:mod:`dessilbi.core.flat`: the state of the tensors of one group, penalty, dtype,
            device and row length in one buffer per bucket; the parameters move into their
            bucket's memory on its first step, :mod:`dessilbi.core.arena`) and, for the
            tensors that stay out, the per-tensor loop on the CPU and the multi-tensor kernels
            on CUDA.
        fused: how the buckets are updated. ``None`` (default): on the CPU, float32 buckets
            take one call of compiled C each (:mod:`dessilbi.core.cpu_kernel`: every entry
            read and written once, gradients read in place, so tensors of any size join a
            bucket; built once per machine by the system's C compiler in under a second;
            ResNet-56 and VGG16-BN steps at or below SGD-foreach's, README), where a compiler
            is; elsewhere the eager bucket step (a few large operations per bucket,
            bit-identical to the per-tensor loop; tensors up to 65,536 entries on the CPU,
            4,194,304 on CUDA), and on the CPU the tensors left out of the buckets are
            compiled with ``torch.compile`` when a group's hold at least
            :data:`AUTO_COMPILE_NUMEL` entries. ``True``: the same on the CPU, any size
            compiled; on CUDA, where Triton is, each bucket's update is one Triton kernel
            that reads G, B, W and V once (:mod:`dessilbi.core.triton_update`; checked
            against the eager step through Triton's interpreter, not yet timed on a GPU).
            ``False``: the eager bucket step, nothing compiled. Every compiled path falls
            back to the eager one, with one warning, where it cannot be built.
        total_steps: the number of optimizer steps the run will take; when ``nu`` is not given
            it sets ν so that the path completes within the run (a 3-epoch run needs a ν ~15×
            smaller than a 40-epoch one).

    State per penalised parameter: ``V`` (same shape as the parameter) and ``momentum_buffer``.
    Γ is available through :meth:`gamma`, its support through :meth:`support` and :meth:`masks`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(),
        ...                             torch.nn.LazyLinear(10))
        >>> _ = model(torch.zeros(1, 1, 8, 8))
        >>> from dessilbi import lbi_param_groups
        >>> opt = DessiLBI(lbi_param_groups(model), lr=0.1, nu=100.0)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 0.1,
        kappa: float = 1.0,
        nu: float | None = None,
        lambda_: float = 1.0,
        penalty: str = "auto",
        group_norm: str = "l2",
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        pull: str = "all",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        total_steps: int | None = None,
    ) -> None:
        if nu is None:
            nu = DEFAULT_NU if total_steps is None else nu_for_steps(float(lr), total_steps, kappa)
        defaults = dict(
            lr=lr, kappa=kappa, nu=nu, lambda_=lambda_, penalty=penalty, group_norm=group_norm,
            momentum=momentum, dampening=dampening, nesterov=nesterov,
            weight_decay=weight_decay, pull=pull, maximize=maximize, foreach=foreach,
            fused=fused,
        )
        check_group(defaults)
        if isinstance(params, set):
            raise TypeError("invalid params: a set has no reproducible order; pass a list")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as torch does: the caller's dict itself, (name, tensor) pairs accepted)
        after validating its hyper-parameters and that no parameter repeats."""
        if isinstance(param_group.get("params"), set):  # torch.optim accepts a top-level set
            raise TypeError("invalid params: a set has no reproducible order; pass a list")
        if not isinstance(param_group.get("params"), (Tensor, type(None))):
            param_group["params"] = list(param_group["params"])
            tensors = [q[1] if isinstance(q, tuple) else q for q in param_group["params"]]
            if len({id(t) for t in tensors}) != len(tensors):  # torch only warns
                raise ValueError("invalid params: a parameter appears twice in one group")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_params(group["params"])
            check_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # saved before ``pull`` existed: the paper's iteration
            group.setdefault("pull", "all")
        for state in self.state.values():  # torch casts state tensors to the parameter dtype
            if "mask" in state:
                state["mask"] = state["mask"].bool()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key in ("foreach", "fused", "maximize"):
                group.setdefault(key, self.defaults.get(key))
            group.setdefault("pull", "all")

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Perform one DessiLBI step; returns the closure's loss when a closure is given."""
        if not torch.is_inference_mode_enabled():
            return self._step(closure)
        # the buckets' memory and the state made here must stay normal tensors: a parameter
        # moved into an inference-mode arena could not be used by autograd again (leaving
        # inference mode turns grad mode back on: off again for the in-place updates)
        with torch.inference_mode(False), torch.no_grad():
            return self._step(closure)

    def _step(self, closure: Callable[[], Tensor] | None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        flat_cache = self.__dict__.setdefault("_flat", {})  # the buckets and the groups' plans
        steady = flat_cache.get("steady")
        if steady is not None and steady(self.param_groups, self.state):
            return loss
        fused: list[tuple[Bundle, dict[str, Any]]] = []
        masked: list[tuple[Tensor, Tensor]] = []
        flat_work: list[tuple[int, dict[str, Any], dict[tuple[Any, ...], list[Tensor]]]] = []
        loose = False  # a gradient outside the flat buckets
        for index, group in enumerate(self.param_groups):
            buckets, others = plan_buckets(flat_cache, index, group, resolve_penalty) \
                if _flat_default(group) else ({}, group["params"])
            compiles = _compiles(group, others)
            bundles = self._bundles(group, others, masked)
            loose |= bool(bundles)
            if buckets:
                flat_work.append((index, group, buckets))
            for (pen, lam), bundle in bundles.items():
                hp = {k: group[k] for k in ("lr", "kappa", "nu", "group_norm", "momentum",
                                            "dampening", "nesterov", "weight_decay", "pull")}
                hp["lambda_"] = lam
                if compiles:  # decided by _compiles (``fused``)
                    fused.append((bundle, dict(params=bundle.params, grads=bundle.grads,
                                               bufs=bundle.bufs, vs=bundle.vs, penalty=pen,
                                               **hp)))
                    continue
                dessilbi_update(bundle.params, bundle.grads, bundle.bufs, bundle.vs,
                                penalty=pen, foreach=group["foreach"],
                                workspaces=self.__dict__.setdefault("_workspaces", {}), **hp)
                bundle.store_buffers(group["momentum"])
        kernel_buckets = step_buckets(flat_cache, self.state, self.param_groups, flat_work) \
            if flat_work else None
        # replayed next time if every gradient took the compiled CPU kernel (core.steady)
        flat_cache["steady"] = SteadyStep.after(self.param_groups, self.state, kernel_buckets) \
            if kernel_buckets is not None and not loose else None
        if fused:
            from ._fused import fused_step

            fused_step([kw for _, kw in fused], self._compiled_cache())
            for (bundle, kw) in fused:
                bundle.store_buffers(kw["momentum"])
        for p, mask in masked:  # entries outside a fixed mask stay exactly zero
            p.mul_(mask)
        return loss

    def _bundles(self, group: dict[str, Any], others: list[Tensor],
                 masked: list[tuple[Tensor, Tensor]]) -> dict[tuple[str, float], Bundle]:
        """The tensors of ``group`` outside the flat buckets that have a gradient, in bundles
        by (penalty, λ) (a tensor with its own threshold, ``state["lambda_"]`` set by
        SparsityTarget, forms a bundle of its own, so the kernels keep one λ per call); their
        fixed masks are added to ``masked``."""
        bundles: dict[tuple[str, float], Bundle] = defaultdict(Bundle)
        for p in others:
            if p.grad is None:
                continue
            check_grad(p.grad)
            state = self.state[p]
            pen = resolve_penalty(group["penalty"], p)
            if pen != "none" and "V" not in state:
                state["V"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            mask = state.get("mask")
            if mask is not None:
                masked.append((p, mask))
            bundles[(pen, state.get("lambda_", group["lambda_"]))].add(
                p, state, mask, group["maximize"])
        return bundles

    def set_mask(self, param: Tensor, mask: Tensor | None) -> None:
        """Fix ``param``'s entries outside ``mask`` at zero from now on (``None`` lifts it).

        ``mask`` is a bool tensor broadcastable to ``param`` (e.g. ``(C_out, 1, 1, 1)`` for whole
        filters). The gradient is masked before the update and the weights after it; the mask is
        part of the optimizer state (``state_dict`` carries it).
        """
        self._group_of(param)  # raises for a tensor the optimizer does not manage
        if mask is None:
            self.state[param].pop("mask", None)
            return
        if mask.dtype != torch.bool:
            raise ValueError(f"invalid mask: expected a bool tensor, got {mask.dtype}")
        try:
            torch.broadcast_shapes(mask.shape, param.shape)
        except RuntimeError as e:
            raise ValueError(f"invalid mask of shape {tuple(mask.shape)} for a parameter of "
                             f"shape {tuple(param.shape)}") from e
        mask = mask.to(param.device)
        self.state[param]["mask"] = mask
        with torch.no_grad():
            param.mul_(mask)

    def _compiled_cache(self) -> dict[str, Any]:
        # Held by the instance (not the module) so compiled kernels die with the optimizer.
        cache = self.__dict__.get("_compiled")
        if cache is None:
            cache = {}
            self.__dict__["_compiled"] = cache
        return cache

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_compiled", None)
        state.pop("_flat", None)
        state.pop("_workspaces", None)
        return state

    # ------------------------------------------------------- the sparse path
    def _group_of(self, param: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError("invalid param: this tensor is not managed by the optimizer")

    def penalty_of(self, param: Tensor) -> str:
        """The concrete penalty (``"lasso"``, ``"group"`` or ``"none"``) applied to ``param``."""
        return resolve_penalty(self._group_of(param)["penalty"], param)

    def penalised_params(self) -> list[Tensor]:
        """All parameters with a lasso or group penalty, in parameter-group order."""
        return [
            p
            for g in self.param_groups
            for p in g["params"]
            if resolve_penalty(g["penalty"], p) != "none"
        ]

    @torch.no_grad()
    def gamma(self, param: Tensor) -> Tensor:
        """Γ = κ prox_λ(V) of a penalised parameter (zeros before its first step)."""
        group = self._group_of(param)
        pen = resolve_penalty(group["penalty"], param)
        if pen == "none":
            raise ValueError("invalid param: it has penalty 'none', so it has no Γ")
        v = self.state[param].get("V")
        if v is None:
            return torch.zeros_like(param)
        lam = self.state[param].get("lambda_", group["lambda_"])
        return prox(v, pen, lam, group["group_norm"]).mul_(group["kappa"])

    def support(self, param: Tensor) -> Tensor:
        """Boolean mask of supp(Γ) = {Γ ≠ 0}, shape of ``param`` (whole filters for ``group``)."""
        return self.gamma(param) != 0

    def masks(self) -> dict[Tensor, Tensor]:
        """{parameter: support mask} for every penalised parameter."""
        return {p: self.support(p) for p in self.penalised_params()}

    def densities(self) -> dict[Tensor, float]:
        """{parameter: |supp(Γ)| / |W|} for every penalised parameter."""
        return {p: float(m.float().mean()) for p, m in self.masks().items()}

    def density(self) -> float:
        """|supp(Γ)| / |W| over all penalised parameters together (0 when there are none)."""
        masks = self.masks()
        total = sum(m.numel() for m in masks.values())
        if total == 0:
            return 0.0
        return float(sum(int(m.sum()) for m in masks.values())) / total


def _compiles(group: dict[str, Any], others: list[Tensor]) -> bool:
    """Whether the group's tensors outside the flat buckets take the compiled update this step
    (``fused``, see :class:`DessiLBI`): never inside a compiled training step, where the
    caller's compiler fuses the update already (a nested compiled call would be inlined)."""
    if torch.compiler.is_compiling():
        return False
    if group["fused"] is not None:
        return bool(group["fused"])
    if group["foreach"] is not None:  # an implementation asked for by name
        return False
    return sum(p.numel() for p in others
               if p.grad is not None and p.device.type == "cpu") >= AUTO_COMPILE_NUMEL


def _flat_default(group: dict[str, Any]) -> bool:
    """Whether the group's small tensors take the flat-bucket step: unless ``foreach`` is
    asked for, and not inside a compiled training step (there the caller's compiler fuses the
    per-tensor update); which tensors are small enough depends on their device
    (:func:`.flat.eligible`). With ``fused`` the tensors too large for a bucket take the
    compiled kernel, so its compilation grows with the number of large tensors only (none in
    a CIFAR ResNet-56)."""
    return group["foreach"] is None and not torch.compiler.is_compiling()


def unwrap_optimizer(optimizer: Any) -> DessiLBI:
    """The :class:`DessiLBI` inside the wrappers of training frameworks (accelerate's
    ``AcceleratedOptimizer`` keeps it as ``.optimizer``, Lightning's ``LightningOptimizer`` as
    ``._optimizer``); a DessiLBI is returned as it is."""
    inner = optimizer
    for _ in range(8):
        if isinstance(inner, DessiLBI):
            return inner
        inner = getattr(inner, "optimizer", None) or getattr(inner, "_optimizer", None)
        if inner is None:
            break
    raise TypeError(f"expected a DessiLBI optimizer (or a framework's wrapper of one), got "
                    f"{type(optimizer).__name__}")
