"""Command-line options generated from :class:`TrainConfig`'s settings (one per flat key), with
a help text each."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from .. import catalog
from ..training.config import FlatField, TrainConfig, flat_fields, load_config_file

__all__ = ["add_config_arguments", "config_from_args", "Parser", "fraction", "positive_int",
           "count", "nonnegative", "positive"]


class Parser(argparse.ArgumentParser):
    """argparse with one line for a bad command line (``dessilbi CMD: error: ...``, exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: Any, ok: Any, why: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {why}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {why}")
        return value

    parse.__name__ = why  # argparse names the type in some messages
    return parse


fraction = _number(float, lambda v: 0.0 < v <= 1.0, "expected a fraction in (0, 1]")
positive_int = _number(int, lambda v: v >= 1, "expected an integer >= 1")
count = _number(int, lambda v: v >= 0, "expected an integer >= 0")
nonnegative = _number(float, lambda v: v >= 0.0, "expected a number >= 0")
positive = _number(float, lambda v: v > 0.0, "expected a number > 0")


_HELP = {
    "model": f"network: {catalog.names(catalog.MODELS)} (dessilbi list)",
    "dataset": "default (fashion-mnist if found, else digits), "
               f"{catalog.names(catalog.DATASETS)} (dessilbi list)",
    "optimizer": f"{catalog.names(catalog.OPTIMIZERS)} (dessilbi list)",
    "kappa": "κ: damping; every step is scaled by κ",
    "nu": "ν: coupling ‖W−Γ‖²/(2ν); sets the speed of the path (smaller = faster); "
          "default: lr·κ·steps/20, from the number of steps of the run; under torchrun "
          "write --coupling-nu",
    "target_density": "fraction of filters / neurons to keep (ν and λ are derived from it "
                      "and the number of steps)",
    "target_macs": "fraction of the dense network's MACs to keep (the units of the same "
                   "ranking whose pruned network costs closest to it; whole filters / neurons "
                   "only)",
    "select_at": "with --target-density / --target-macs: when the support reaches the "
                 "target, as a fraction of the run (default 0.3)",
    "freeze": "with a target: fix the mask at selection and train the subnetwork for "
              "the rest of the run (--no-freeze: the pure path)",
    "keep_first_layer": "with a target: keep every filter / neuron of the first layer (it "
                        "reads the input; its units are counted in the target)",
    "pull": "with a target: outside (default: the coupling decays only the units outside "
            "supp(Γ), those inside train as SGD), all (the paper's iteration) or conv-outside "
            "(outside on the convolutions, all on the linear layers)",
    "support": "with a target: how the support reaches it: shrink (default: from every unit "
               "down to the target, cubic) or grow (from empty, the inverse scale space)",
    "start_at": "with a target: when the support starts moving towards it, as a fraction of "
                "the run (default 0: from the first step; it must be before --select-at)",
    "reserve": "with a target: each layer's N best filters / neurons come first in the "
               "ranking, inside the target's count (a narrow layer is not cut into a "
               "bottleneck; default 8, 0: the ranking alone)",
    "score": "with a target: how the global ranking puts layers on one scale: initial "
             "(default: a unit's ‖V_g‖ over its layer's initial mean unit norm) or mean (over "
             "the layer's current mean ‖V_g‖)",
    "width_prior": "with a target: multiply a layer's scores by (mean layer width / its "
                   "width)^P, so that the units of narrow layers rank higher (default 0.25, 0: "
                   "the scores alone)",
    "keep_classifier": "leave the layer that produces the outputs unpenalised",
    "linear_penalty": "group (one group per output neuron, default) or lasso (element-wise, "
                      "as in the paper's LeNet tables) or none",
    "lambda_": "λ: prox threshold",
    "lambda_conv": "λ for conv layers (default: --lambda)",
    "schedule": "none, multistep (with --milestones), cosine, step (with --step-size)",
    "amp": "none, bf16 or fp16 (fp16 needs CUDA)",
    "final_lr": "AdaBound's final (SGD-like) learning rate",
    "fused": "compile the DessiLBI update of every large layer (without it, only a model with "
             "over 4 M weights in large layers compiles them, on the first step)",
    "max_train_batches": "truncate every epoch to this many batches (0: whole epoch)",
    "path_every": "record the solution path every N epochs (0: never)",
    "name": "run folder name under --runs-dir (default: derived from the configuration)",
    "width": "channel multiplier of vgg16_bn / resnet* (narrow starts for growing)",
    "data_dir": "folder of the datasets (idx / CIFAR batches / ImageNet folders)",
    "download": "download a missing torchvision dataset into --data-dir",
    "lr": "learning rate α",
    "momentum": "momentum factor in [0, 1)",
    "nesterov": "Nesterov momentum",
    "weight_decay": "L2 penalty of conv / linear weights (never of biases and norms)",
    "group_norm": "l2 thresholds ‖V_g‖₂, rms thresholds ‖V_g‖₂/√n_g",
    "conv_penalty": "group (one group per output filter), lasso or none",
    "exclude": "modules (names as in named_modules()) whose weights get no penalty",
    "epochs": "number of epochs",
    "batch_size": "training batch size",
    "milestones": "epochs at which multistep multiplies the lr by --lr-gamma",
    "lr_gamma": "lr factor of multistep / step",
    "step_size": "epochs between lr steps of the step schedule",
    "seed": "seed of the initial weights, the batches and the augmentation",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N",
    "channels_last": "channels-last memory format (faster convolutions on CUDA)",
    "workers": "DataLoader worker processes",
    "synthetic_size": "with --dataset synthetic: samples, channels, image size, classes",
    "init_from": "start from these weights (a run's init.pt: lottery-ticket rewinding)",
    "mask": "keep the weights outside this mask file at zero",
    "runs_dir": "where run folders are made",
    "log_every": "log the training loss every N batches",
    "progress": "progress bar (only when stderr is a terminal)",
    "tensorboard": "write TensorBoard event files into the run folder",
}


def _help_of(f: FlatField) -> str:
    """The setting's help with its default (argparse shows None: the default is the config's)."""
    text = _HELP[f.key]
    if "default" in text:
        return text
    default = f.default
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, list):
        shown = " ".join(map(str, default)) or "none"
    else:
        shown = str(default) if default not in ("", None) else "none"
    return f"{text} (default: {shown})"


def arg_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return arg_type(inner[0])
    if origin is list:
        (inner,) = typing.get_args(tp)
        return inner, {"nargs": "*"}
    if tp is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    return tp, {}


# torchrun's own parser reads every option of the command line, its script's included, and
# rejects ``--nu`` as an ambiguous prefix of its ``--numa-binding``: the alias gets through.
_ALIASES = {"nu": ["--coupling-nu"]}


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`TrainConfig` setting (default None = not given)."""
    for f in flat_fields():
        flags = ["--" + f.key.rstrip("_").replace("_", "-"), *_ALIASES.get(f.key, [])]
        tp, extra = arg_type(f.type)
        kwargs: dict[str, Any] = {"dest": f.key, "default": None,
                                  "help": _help_of(f), **extra}
        if tp is not None:
            kwargs["type"] = tp
            kwargs["metavar"] = f.key.rstrip("_").upper()
        p.add_argument(*flags, **kwargs)


def config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> TrainConfig:
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        data.update(load_config_file(args.config))
    for f in flat_fields():
        v = getattr(args, f.key, None)
        if v is not None:
            data[f.key] = v
    data.update(extra or {})  # a sweep's grid point wins over the shared options
    return TrainConfig.from_dict(data, source=str(getattr(args, "config", None) or "options"))


# ------------------------------------------------------------------------------- commands
