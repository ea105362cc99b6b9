"""Run configuration: nested frozen sections, validated, loadable from YAML / TOML, named by
their content.

A :class:`TrainConfig` holds one section per concern: ``net`` (which network), ``data`` (which
dataset and how it is read), ``optim`` (the optimizer: :class:`OptimizerConfig`, the same
dataclass ``create_optimizer`` reads), ``target`` (the sparsity target), ``sched`` (epochs and
learning-rate schedule) and ``run`` (seed, device, precision, where and how the run is written).
Every setting also has a *flat key*, its field name (``lr``, ``epochs``, ``target_density``;
the optimizer's name is ``optimizer``, the schedule's ``schedule``): the keys of a config file,
the command-line flags and the run folder's stored ``config.json`` use them, and
``cfg.lr`` reads ``cfg.optim.lr``. Configurations are never changed in place:
:meth:`TrainConfig.replace` returns a new one.

Runs are stored under ``runs_dir/<name>`` where ``name`` defaults to a readable prefix
(dataset, model, optimizer and its key hyper-parameters) and a short hash of the settings that
change the result and differ from their defaults, as open_lth does: the same configuration
always lands in the same folder, which is what makes ``--resume`` and ``dessilbi sweep`` able
to find finished runs.
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
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from ..core.optimizer_config import OptimizerConfig
from ..errors import ConfigError

# The registries (models, datasets, optimizers) import torch; they are read when a
# configuration is validated or built, not when it is imported, so that the command line can
# parse (and --help) without loading torch.

__all__ = ["TrainConfig", "ConfigError", "FlatField", "flat_fields", "load_config_file",
           "resolve_default_dataset", "NetConfig", "DataConfig", "OptimizerConfig",
           "TargetConfig", "ScheduleConfig", "RunConfig"]

SCHEDULES = ("none", "multistep", "cosine", "step")
AMP_MODES = ("none", "bf16", "fp16")

# Fields that do not change what a run computes: left out of the run-name hash.
_NOT_HASHED = {"runs_dir", "name", "device", "workers", "log_every", "data_dir", "download",
               "progress", "tensorboard"}
# Keys added since the first release: left out of the hash of older run folders' names.
_NOT_LEGACY = {"final_lr", "target_macs", "keep_first_layer", "pull", "support", "start_at",
               "reserve", "score", "width_prior"}
# Defaults changed since runs were named, oldest first. With a target, the first (the default
# when the key named nothing) keeps the names it gave and every other value names runs of its
# own; without a target these settings compute nothing, and no default of any release names.
_FORMER_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "pull": ("all", "conv-outside"), "select_at": (0.5,), "support": ("grow",), "reserve": (0,),
    "width_prior": (0.0,)}


@dataclass(frozen=True)
class NetConfig:
    """Which network: a name of the model registry and its channel multiplier."""

    model: str = "lenet3"
    width: float = 1.0  # channel multiplier (vgg16_bn, resnet*): narrow starts for growing


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it is read from, and how it is batched."""

    dataset: str = "default"  # fashion-mnist when it is found, otherwise digits
    data_dir: str = "data"
    download: bool = False
    batch_size: int = 128
    workers: int = 0
    max_train_batches: int = 0  # 0 = the whole epoch; >0 truncates epochs (smoke tests)
    synthetic_size: list[int] = field(default_factory=lambda: [512, 1, 28, 10])


@dataclass(frozen=True)
class TargetConfig:
    """The sparsity target (SparsityTarget): units or MACs kept, when, and what happens after."""

    density: float | None = None  # fraction of filters / neurons kept
    macs: float | None = None  # fraction of the dense network's MACs kept
    select_at: float = 0.3  # when the target is reached, as a fraction of the run
    freeze: bool = True  # fix the mask at selection and train the subnetwork after it
    keep_first_layer: bool = False  # keep every unit of the layer that reads the input
    pull: str = "outside"  # the units the coupling pulls W on: outside supp(Γ), all, or
    # outside supp(Γ) on the convolutions and all on the linear layers (conv-outside)
    support: str = "shrink"  # how the support reaches the target: shrink (1 → D) or grow (0 → D)
    start_at: float = 0.0  # when the support starts moving towards the target (fraction of run)
    reserve: int = 8  # each layer's best units counted first in the ranking (narrow layers)
    score: str = "initial"  # a layer's ‖V_g‖ over its initial unit norm, or its current mean
    width_prior: float = 0.25  # scores × (mean layer width / layer width)^width_prior


@dataclass(frozen=True)
class ScheduleConfig:
    """The training budget and the learning-rate schedule over it."""

    epochs: int = 20
    kind: str = "none"
    milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    step_size: int = 30


@dataclass(frozen=True)
class RunConfig:
    """Seed, device and precision, the files the run starts from, and how it is written."""

    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    path_every: int = 1  # record the solution path every N epochs (0 = never)
    init_from: str = ""  # start from these weights (a run's init.pt: lottery-ticket rewinding)
    mask: str = ""  # keep the weights outside this mask at zero (weights and gradients masked)
    runs_dir: str = "runs"
    name: str = ""
    log_every: int = 20
    progress: bool = True
    tensorboard: bool = True


_SECTIONS: dict[str, type] = {"net": NetConfig, "data": DataConfig, "optim": OptimizerConfig,
                              "target": TargetConfig, "sched": ScheduleConfig, "run": RunConfig}
# Section fields whose flat key is not their own name.
_RENAMED = {("optim", "name"): "optimizer", ("target", "density"): "target_density",
            ("target", "macs"): "target_macs", ("sched", "kind"): "schedule"}


class FlatField(NamedTuple):
    """One setting under its flat key (config-file key, flag, ``config.json`` key)."""

    key: str
    section: str
    attr: str
    type: Any
    default: Any


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def flat_fields() -> list[FlatField]:
    """Every setting of a :class:`TrainConfig` by its flat key, section by section."""
    out = []
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            key = _RENAMED.get((section, f.name), f.name)
            out.append(FlatField(key, section, f.name, hints[f.name], _default_of(f)))
    return out


_FLAT: dict[str, FlatField] = {f.key: f for f in flat_fields()}


@dataclass(frozen=True, init=False)
class TrainConfig:
    """A training run's configuration: one frozen section per concern (see the module).

    Built from sections, from flat keys, or both (flat keys win)::

        TrainConfig(optim=OptimizerConfig(lr=0.05), epochs=3)
        TrainConfig(lr=0.05, epochs=3)  # the same configuration

    An unknown key raises ``TypeError``, as a dataclass does.
    """

    net: NetConfig
    data: DataConfig
    optim: OptimizerConfig
    target: TargetConfig
    sched: ScheduleConfig
    run: RunConfig

    def __init__(self, net: NetConfig | None = None, data: DataConfig | None = None,
                 optim: OptimizerConfig | None = None, target: TargetConfig | None = None,
                 sched: ScheduleConfig | None = None, run: RunConfig | None = None,
                 **flat: Any) -> None:
        given = dict(net=net, data=data, optim=optim, target=target, sched=sched, run=run)
        unknown = set(flat) - set(_FLAT)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        for section, cls in _SECTIONS.items():
            changes = {_FLAT[k].attr: v for k, v in flat.items() if _FLAT[k].section == section}
            value = given[section] or cls()
            object.__setattr__(self, section, dataclasses.replace(value, **changes))

    def __getattr__(self, key: str) -> Any:
        """A setting by its flat key: ``cfg.lr`` is ``cfg.optim.lr``."""
        where = _FLAT.get(key)
        if where is None:
            raise AttributeError(f"{type(self).__name__!s} has no setting {key!r}")
        return getattr(getattr(self, where.section), where.attr)

    # ------------------------------------------------------------------ building
    def replace(self, **values: Any) -> TrainConfig:
        """A copy with the given flat keys changed."""
        return type(self)(**{**self.to_dict(), **values})

    @classmethod
    def from_stored(cls, data: dict[str, Any], source: str = "checkpoint") -> TrainConfig:
        """The configuration a run folder stored: a key it lacks was not an option yet, so it
        takes the default of the release that wrote it (``pull``: ``"all"``, ``support``:
        ``"grow"``)."""
        return cls.from_dict({**{k: v[0] for k, v in _FORMER_DEFAULTS.items()}, **data},
                             source=source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping of flat keys and / or sections (``optim: {lr: 0.05}``),
        rejecting unknown keys (``-`` and ``_`` are interchangeable, ``lambda`` is ``lambda_``)."""
        by_attr = {(f.section, f.attr): f.key for f in _FLAT.values()}
        values: dict[str, Any] = {}
        for key, value in data.items():
            k = _normalise(key)
            if k in _SECTIONS and isinstance(value, dict):
                for sub, v in value.items():
                    a = _normalise(sub)
                    if (k, a) not in by_attr:
                        raise ConfigError(f"{source}: unknown key {key}.{sub!s}; the {k} section "
                                          f"has {', '.join(f.name for f in fields(_SECTIONS[k]))}")
                    values[by_attr[(k, a)]] = v
            elif k in _FLAT:
                values[k] = value
            else:
                raise ConfigError(f"{source}: unknown key {key!r}; known keys: "
                                  f"{', '.join(sorted(_FLAT))} (or the sections "
                                  f"{', '.join(_SECTIONS)})")
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from e

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
        positive = ("lr", "kappa", "nu", "batch_size", "epochs", "lr_gamma", "step_size", "width",
                    "final_lr")
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
        self._validate_target(bad)
        if self.lambda_conv is not None and not self.lambda_conv >= 0:
            raise bad("lambda_conv", "must be >= 0")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "must be in [0, 1)")
        if self.nesterov and self.momentum == 0:
            raise bad("nesterov", "needs momentum > 0")
        from ..core.penalties import PENALTIES

        for f, choices in (("schedule", SCHEDULES), ("amp", AMP_MODES),
                           ("group_norm", ("l2", "rms")), ("conv_penalty", tuple(PENALTIES)),
                           ("pull", ("all", "outside", "conv-outside")),
                           ("support", ("grow", "shrink")), ("score", ("initial", "mean")),
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

    def _validate_target(self, bad: Callable[[str, str], ConfigError]) -> None:
        """The checks of the sparsity target's settings (``validate``'s part)."""
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
        if isinstance(self.start_at, bool) or not isinstance(self.start_at, int | float) \
                or not 0 <= self.start_at < self.select_at:
            raise bad("start_at", "must be a fraction of the run in [0, select_at)")
        if isinstance(self.reserve, bool) or not isinstance(self.reserve, int) \
                or self.reserve < 0:
            raise bad("reserve", "must be a whole number of units >= 0")
        if isinstance(self.width_prior, bool) or not isinstance(self.width_prior, int | float) \
                or not 0 <= self.width_prior < math.inf:
            raise bad("width_prior", "must be a number >= 0")

    # ------------------------------------------------------------------ derived
    def resolved(self) -> tuple[TrainConfig, str]:
        """A copy with everything that depends on the machine decided (``dataset="default"``),
        and a note saying what was chosen; names and hashes are taken from the resolved copy."""
        if self.dataset != "default":
            return self, ""
        dataset, note = resolve_default_dataset(self.data_dir)
        return self.replace(dataset=dataset), note

    def to_dict(self) -> dict[str, Any]:
        """Every setting by its flat key (what ``config.json`` stores)."""
        return {f.key: _copy(getattr(getattr(self, f.section), f.attr)) for f in _FLAT.values()}

    def to_nested(self) -> dict[str, dict[str, Any]]:
        """The sections as nested mappings (a config file in this shape loads back)."""
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Hash of the settings that change what the run computes and differ from their
        defaults (a new option leaves every existing name as it is, as open_lth's run ids do);
        an init or mask file counts by its content, not its path (a moved run keeps its name)."""
        items = {k: v for k, v in self.to_dict().items()
                 if k not in _NOT_HASHED and not self._names_nothing(k, v)}
        for k in ("init_from", "mask"):
            if items.get(k) and Path(items[k]).is_file():
                items[k] = "sha256:" + _file_digest(Path(items[k]))
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:8]

    def _names_nothing(self, key: str, value: Any) -> bool:
        """Whether ``value`` of ``key`` is a default, left out of the run's name."""
        if key not in _FORMER_DEFAULTS:
            return bool(value == _FLAT[key].default)
        if self.target_density is None and self.target_macs is None:
            return value in (*_FORMER_DEFAULTS[key], _FLAT[key].default)
        return bool(value == _FORMER_DEFAULTS[key][0])

    def legacy_config_hash(self) -> str:
        """The hash of releases before 0.2 (every field those releases had, files by path):
        finds older folders (the run records committed in docs/results carry such names)."""
        items = {k: v for k, v in self.to_dict().items() if k not in _NOT_HASHED
                 and not (k in _NOT_LEGACY and self._names_nothing(k, v))}
        for k in _FORMER_DEFAULTS.keys() & items.keys():  # a setting those releases had:
            if self._names_nothing(k, items[k]):  # with the value it had when it named nothing
                items[k] = _FORMER_DEFAULTS[k][0]
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


def _normalise(key: Any) -> str:
    k = str(key).replace("-", "_")
    return "lambda_" if k == "lambda" else k


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


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
    for f in _FLAT.values():
        value = getattr(cfg, f.key)
        if not _fits(value, f.type):
            raise ConfigError(f"invalid {f.key}={value!r}: expected {_kind(f.type)}")


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
