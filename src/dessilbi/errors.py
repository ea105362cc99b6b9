"""The errors dessilbi raises for a bad input or a run it cannot continue (a leaf, torch-free).

The command line turns each into one line and an exit code (2 for bad input, 1 for a run that
stopped); it imports them from here, so that it does not load torch to know them. Each is also
importable from the module that raises it.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "CorruptDatasetError", "DatasetNotFoundError",
           "NonFiniteLossError", "RunExistsError", "RunLockedError"]


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the field."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not a dessilbi checkpoint."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where we looked."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but is truncated or malformed."""


class RunExistsError(RuntimeError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


class RunLockedError(RuntimeError):
    """Another process is training in the run folder."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""
