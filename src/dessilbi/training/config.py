"""Run configuration: one dataclass, validated, loadable from YAML / TOML, named by its content.

Runs are stored under ``runs_dir/<name>`` where ``name`` defaults to a readable prefix
(dataset, model, optimizer and its key hyper-parameters) and a short hash of every setting that
changes the result, as open_lth does: the same configuration always lands in the same folder,
which is what makes ``--resume`` and ``dessilbi sweep`` able to find finished runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.optimizers import OptimizerConfig

# The registries (models, datasets, optimizers) import torch; they are read when a
# configuration is validated or built, not when it is imported, so that the command line can
# parse (and --help) without loading torch.

__all__ = ["TrainConfig", "ConfigError", "load_config_file", "resolve_default_dataset"]

SCHEDULES = ("none", "multistep", "cosine", "step")
AMP_MODES = ("none", "bf16", "fp16")

# Fields that do not change what a run computes: left out of the run-name hash.
_NOT_HASHED = {"runs_dir", "name", "device", "workers", "log_every", "data_dir", "download",
               "progress", "tensorboard"}


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the field."""


@dataclass
class TrainConfig:
    """Everything a training run depends on."""

    model: str = "lenet3"
    width: float = 1.0  # channel multiplier (vgg16_bn, resnet*): narrow starts for growing
    dataset: str = "default"  # fashion-mnist when it is found, otherwise digits
    data_dir: str = "data"
    download: bool = False
    optimizer: str = "dessilbi"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    kappa: float = 1.0
    nu: float | None = None  # None: ν = lr·κ·steps/20, from the run's number of steps
    lambda_: float = 1.0
    lambda_conv: float | None = None
    group_norm: str = "l2"
    conv_penalty: str = "group"
    linear_penalty: str = "group"  # one group per output neuron: removable neurons
    keep_classifier: bool = True  # the layer producing the outputs gets no penalty
    exclude: list[str] = field(default_factory=list)
    target_density: float | None = None  # fraction of filters / neurons kept (SparsityTarget)
    target_macs: float | None = None  # fraction of the dense network's MACs kept (SparsityTarget)
    select_at: float = 0.5  # when the target is reached, as a fraction of the run
    freeze: bool = True  # fix the mask at selection and train the subnetwork after it
    epochs: int = 20
    batch_size: int = 128
    schedule: str = "none"
    milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    step_size: int = 30
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    fused: bool = False
    workers: int = 0
    max_train_batches: int = 0  # 0 = the whole epoch; >0 truncates epochs (smoke tests)
    synthetic_size: list[int] = field(default_factory=lambda: [512, 1, 28, 10])
    path_every: int = 1  # record the solution path every N epochs (0 = never)
    init_from: str = ""  # start from these weights (a run's init.pt: lottery-ticket rewinding)
    mask: str = ""  # keep the weights outside this mask at zero (weights and gradients masked)
    runs_dir: str = "runs"
    name: str = ""
    log_every: int = 20
    progress: bool = True
    tensorboard: bool = True

    # ------------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        def bad(f: str, why: str) -> ConfigError:
            return ConfigError(f"invalid {f}={getattr(self, f)!r}: {why}")

        _check_types(self)
        if self.log_every < 1:
            raise bad("log_every", "must be an integer >= 1")
        if not _DEVICE.fullmatch(self.device):
            raise bad("device", "choose auto, cpu, cuda, cuda:N, mps or xpu")
        from ..core.optimizers import OPTIMIZERS
        from ..zoo.data import DATASETS
        from ..zoo.models import MODELS

        if self.model not in MODELS:
            raise bad("model", f"choose one of {', '.join(sorted(MODELS))}")
        if self.dataset not in DATASETS + ("default",):
            raise bad("dataset", f"choose one of default, {', '.join(DATASETS)}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"choose one of {', '.join(OPTIMIZERS)}")
        positive = ("lr", "kappa", "nu", "batch_size", "epochs", "lr_gamma", "step_size", "width")
        for f in positive:
            v = getattr(self, f)
            if f == "nu" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 or (
                    f != "nu" and not math.isfinite(v)):
                raise bad(f, "must be a number > 0")
        for f in ("weight_decay", "lambda_", "max_train_batches", "workers", "path_every",
                  "log_every"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
                raise bad(f, "must be a number >= 0")
        for f in ("target_density", "target_macs"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                  or not 0 < v <= 1):
                raise bad(f, "must be a fraction in (0, 1]")
            if v is not None and self.optimizer != "dessilbi":
                raise bad("optimizer", "a sparsity target steers DessiLBI; use --optimizer "
                          "dessilbi")
        if self.target_density is not None and self.target_macs is not None:
            raise bad("target_macs", "aim at units (target_density) or at MACs, not both")
        if isinstance(self.select_at, bool) or not isinstance(self.select_at, int | float) \
                or not 0 < self.select_at <= 1:
            raise bad("select_at", "must be a fraction of the run in (0, 1]")
        if self.lambda_conv is not None and not self.lambda_conv >= 0:
            raise bad("lambda_conv", "must be >= 0")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "must be in [0, 1)")
        if self.nesterov and self.momentum == 0:
            raise bad("nesterov", "needs momentum > 0")
        from ..core.penalties import PENALTIES

        for f, choices in (("schedule", SCHEDULES), ("amp", AMP_MODES),
                           ("group_norm", ("l2", "rms")), ("conv_penalty", tuple(PENALTIES)),
                           ("linear_penalty", tuple(PENALTIES))):
            if getattr(self, f) not in choices:
                raise bad(f, f"choose one of {', '.join(choices)}")
        if self.schedule == "multistep" and not self.milestones:
            raise bad("milestones", "the multistep schedule needs milestones, e.g. 80 120")
        if any(not isinstance(m, int) or m <= 0 for m in self.milestones):
            raise bad("milestones", "must be positive epoch numbers")
        if len(self.synthetic_size) != 4 or any(int(v) < 1 for v in self.synthetic_size):
            raise bad("synthetic_size", "must be 4 positive integers: n channels size classes")
        for f in ("init_from", "mask"):
            if getattr(self, f) and not Path(getattr(self, f)).is_file():
                raise bad(f, "no such file")
        if self.name and (os.sep in self.name or self.name.startswith(".")):
            raise bad("name", "must be a plain folder name")
        return self

    # ------------------------------------------------------------------ derived
    def resolved(self) -> tuple[TrainConfig, str]:
        """A copy with everything that depends on the machine decided (``dataset="default"``),
        and a note saying what was chosen; names and hashes are taken from the resolved copy."""
        if self.dataset != "default":
            return self, ""
        dataset, note = resolve_default_dataset(self.data_dir)
        return dataclasses.replace(self, dataset=dataset), note

    def optimizer_config(self) -> OptimizerConfig:
        from ..core.optimizers import OptimizerConfig

        names = {f.name for f in fields(OptimizerConfig)} - {"name"}
        return OptimizerConfig(name=self.optimizer,
                               **{k: getattr(self, k) for k in names if hasattr(self, k)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Hash of the settings that change what the run computes and differ from their
        defaults (a new option leaves every existing name as it is, as open_lth's run ids do);
        an init or mask file counts by its content, not its path (a moved run keeps its name)."""
        defaults = {f.name: _default_of(f) for f in fields(self)}
        items = {k: v for k, v in self.to_dict().items()
                 if k not in _NOT_HASHED and v != defaults[k]}
        for k in ("init_from", "mask"):
            if items.get(k) and Path(items[k]).is_file():
                items[k] = "sha256:" + _file_digest(Path(items[k]))
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:8]

    def legacy_config_hash(self) -> str:
        """The hash of releases before 0.2 (every field, files by path): finds older folders."""
        items = {k: v for k, v in self.to_dict().items() if k not in _NOT_HASHED}
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:8]

    def run_name(self, legacy: bool = False) -> str:
        if self.name:
            return self.name
        opt = self.optimizer
        if opt == "dessilbi" and self.target_density is not None:
            opt += f"_units{self.target_density:g}"
        elif opt == "dessilbi" and self.target_macs is not None:
            opt += f"_macs{self.target_macs:g}"
        elif opt == "dessilbi":
            nu = "auto" if self.nu is None else f"{self.nu:g}"
            opt += f"_k{self.kappa:g}_nu{nu}_lam{self.lambda_:g}"
        digest = self.legacy_config_hash() if legacy else self.config_hash()
        return f"{self.dataset}_{self.model}_{opt}_lr{self.lr:g}_e{self.epochs}_s{self.seed}" \
               f"_{digest}"

    def run_dir(self) -> Path:
        """``runs_dir/run_name()``, or the folder an earlier release named when only that
        one exists (so runs trained before the naming change are found and resumed)."""
        current = Path(self.runs_dir) / self.run_name()
        if not current.exists() and not self.name:
            legacy = Path(self.runs_dir) / self.run_name(legacy=True)
            if legacy.exists():
                return legacy
        return current

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping, rejecting unknown keys (``-`` and ``_`` are interchangeable)."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in data.items():
            k = str(key).replace("-", "_")
            if k == "lambda":
                k = "lambda_"
            if k not in known:
                raise ConfigError(f"{source}: unknown key {key!r}; known keys: "
                                  f"{', '.join(sorted(known))}")
            kwargs[k] = value
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from e


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml`` / ``.yml``) or TOML (``.toml``) file into a dict."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return data


_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the annotated type ``tp`` (no coercion: 'no' is not a bool,
    1.5 is not an integer, '0.5' is not a number)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_fits(v, inner) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _kind(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in typing.get_args(tp) if a is not type(None)) \
            + " (or null)"
    if origin is list:
        return f"a list of {_kind(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    return _KINDS.get(tp, getattr(tp, "__name__", str(tp)))


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if not _fits(value, hints[f.name]):
            raise ConfigError(f"invalid {f.name}={value!r}: expected {_kind(hints[f.name])}")


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_default_dataset(data_dir: str) -> tuple[str, str]:
    """The dataset of ``dataset="default"``: Fashion-MNIST if found, else digits (and why)."""
    from ..zoo.data import DEBIAN_FASHION_MNIST

    for d in (Path(data_dir) / "FashionMNIST" / "raw", Path(data_dir), DEBIAN_FASHION_MNIST):
        if any((d / f"train-images-idx3-ubyte{s}").is_file() for s in ("", ".gz")):
            return "fashion-mnist", f"Fashion-MNIST found in {d}"
    return "digits", ("Fashion-MNIST not found (apt-get install dataset-fashion-mnist); "
                      "using scikit-learn's bundled 8×8 digits")
