"""Median ``step()`` time of DessiLBI vs ``torch.optim.SGD(momentum=0.9, foreach=True)``.

Parameter shapes of CIFAR ResNet-56 and VGG16-BN, gradients fixed, V prepared so that about half
of the filters (and half of the linear weights) are in the support of Γ. All optimizers are timed
in one process with interleaved repetitions in a rotating order, so the ratios are comparable
even on a noisy machine. The first DessiLBI built measures 3-5 % slower on the CPU and up to
10 % on an H200 whatever its flags (docs/cuda.md), so ``--build-shift N`` rotates the order in
which the variants are built; runs with N = 0..4 give each variant every place. Prints a
Markdown table; ``--out FILE`` also writes it.
"first step" is the time of each optimizer's first ``step()``, compilation included; the first
DessiLBI that compiles pays the cold cost, so for a cold figure run in a fresh process with an
empty compile cache:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/optimizer_step.py [--reps 40] \
        [--models resnet56 vgg16_bn] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dessilbi import DessiLBI, lbi_param_groups
from dessilbi.zoo.models import create_model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


IMPLS = ("dessilbi-default", "dessilbi-eager", "dessilbi-single", "dessilbi-foreach",
         "dessilbi-fused")


def build_order(shift: int) -> list[str]:
    """SGD first, then the DessiLBI variants rotated by ``shift``: the first DessiLBI built
    measures slower whatever its flags (docs/cuda.md), so runs with shifts 0 to 4 give every
    variant each place once."""
    k = shift % len(IMPLS)
    return ["sgd-foreach", *IMPLS[k:], *IMPLS[:k]]


def prepare(name: str, device: str, shift: int = 0,
            ) -> tuple[torch.nn.Module, dict[str, torch.optim.Optimizer], dict[str, float]]:
    torch.manual_seed(0)
    base = create_model(name, 10, 3, 32).to(device)
    for p in base.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    opts: dict[str, torch.optim.Optimizer] = {}
    first: dict[str, float] = {}  # seconds of the first step (compilation included)
    models = {}
    for impl in build_order(shift):
        model = create_model(name, 10, 3, 32).to(device)
        model.load_state_dict(base.state_dict())
        for p, q in zip(model.parameters(), base.parameters()):
            p.grad = q.grad.clone()
        if impl == "sgd-foreach":
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)
        else:
            flags = {"dessilbi-default": {}, "dessilbi-eager": {"fused": False},
                     "dessilbi-single": {"foreach": False}, "dessilbi-foreach": {"foreach": True},
                     "dessilbi-fused": {"fused": True}}
            opt = DessiLBI(lbi_param_groups(model), lr=1e-4, nu=100.0, lambda_=1.0,
                           **flags[impl])
            _sync(device)
            t0 = time.perf_counter()
            opt.step()  # create V and the momentum buffers (and compile the compiled paths)
            _sync(device)
            first[impl] = time.perf_counter() - t0
            _half_support(opt)
        opts[impl] = opt
        models[impl] = model
    return base, opts, first


@torch.no_grad()
def _half_support(opt: DessiLBI) -> None:
    """Set V so that every other filter / weight is above the threshold λ = 1."""
    for p in opt.penalised_params():
        v = opt.state[p]["V"]
        v.copy_(torch.randn_like(v))
        if opt.penalty_of(p) == "group":
            rows = v.flatten(1) if v.is_contiguous() else v.reshape(v.shape[0], -1)
            norms = rows.norm(dim=1).clamp_min(1e-12)
            target = torch.where(torch.arange(v.shape[0], device=v.device) % 2 == 0, 2.0, 0.5)
            v.mul_((target / norms).reshape((-1,) + (1,) * (v.ndim - 1)))
        else:
            v.copy_(torch.where(torch.rand_like(v) < 0.5, 2.0, 0.5) * torch.sign(v))


def working_bytes(opt: torch.optim.Optimizer) -> int:
    """Scratch memory kept between steps: the flat buckets' gather buffers (made only where
    a step needs them; their weights buffer is the parameters themselves where they were
    adopted) and the per-tensor loop's W − Γ buffer (V and the momentum buffer are the
    state)."""
    from dessilbi.core.flat import FlatBucket

    held = [t for b in opt.__dict__.get("_flat", {}).values() if isinstance(b, FlatBucket)
            for t in (b._grads, None if b.adopted else b.weights, b.gap) if t is not None]
    held += list(opt.__dict__.get("_workspaces", {}).values())
    return sum(t.numel() * t.element_size() for t in held)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def run(names: list[str], reps: int, device: str, shift: int = 0) -> str:
    rows = ["| model | params | optimizer | median step (ms) | ratio vs SGD-foreach | "
            "state / param bytes | scratch / param bytes | Γ filter density | first step (s) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        base, opts, first = prepare(name, device, shift)
        n_params = sum(p.numel() for p in base.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
        times: dict[str, list[float]] = {k: [] for k in opts}
        for _ in range(3):
            for opt in opts.values():
                opt.step()
        order = list(opts.items())
        for rep in range(reps):
            # interleaved, so every impl sees the same noise, and rotated: the one timed right
            # after another's step measured slower (CPU caches), whichever it was
            for impl, opt in order[rep % len(order):] + order[:rep % len(order)]:
                _sync(device)
                t0 = time.perf_counter()
                opt.step()
                _sync(device)
                times[impl].append(time.perf_counter() - t0)
        sgd = statistics.median(times["sgd-foreach"])
        for impl, opt in opts.items():
            med = statistics.median(times[impl])
            density = "—"
            if isinstance(opt, DessiLBI):
                convs = [p for p in opt.penalised_params() if opt.penalty_of(p) == "group"]
                kept = sum(int(opt.support(p).flatten(1).any(1).sum()) for p in convs)
                density = f"{kept / sum(p.shape[0] for p in convs):.2f}"
            rows.append(
                f"| {name} | {n_params:,} | {impl} | {med * 1e3:.3f} | {med / sgd:.2f} | "
                f"{state_bytes(opt) / param_bytes:.2f} | "
                f"{working_bytes(opt) / param_bytes:.2f} | {density} | "
                f"{first.get(impl, 0.0):.2f} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg16_bn"])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--build-shift", type=int, default=0,
                    help="rotate the order in which the DessiLBI variants are built")
    args = ap.parse_args()
    table = run(args.models, args.reps, args.device, args.build_shift)
    header = (f"torch {torch.__version__}, device {args.device}, "
              f"{torch.get_num_threads()} threads, {args.reps} interleaved repetitions, "
              f"built in the order {', '.join(build_order(args.build_shift))}\n\n")
    print(header + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
