"""The errors tlkit raises for a user's mistake: bad settings, missing or unusable files.

Every one derives from `TlkitError`, which the command line reports in one line (exit status 2;
`TrainingDivergedError` exits 1); any other exception is a bug and keeps its traceback. Each
also keeps the builtin base that callers caught before (`ValueError`, `FileNotFoundError`, ...).
This module imports nothing, so the command line can catch these before loading torch.
"""


class TlkitError(Exception):
    """A problem with the user's input, settings or files; the message says what to change."""


class ConfigError(TlkitError, ValueError):
    """A setting is invalid: a config key or value, a flag, a search space."""


class InputNotFoundError(TlkitError, FileNotFoundError):
    """A file or folder named by the user does not exist."""


class OutputExistsError(TlkitError, FileExistsError):
    """The output folder already holds a run or an export that would be overwritten."""


class WeightsUnavailableError(TlkitError, RuntimeError):
    """Pretrained weights were asked for but cannot be loaded; the message says how to get them."""


class DatasetError(TlkitError, ValueError):
    """The data cannot be used as given; the message names the problem and the path."""


class ExportError(TlkitError, ValueError):
    """An export cannot be made, verified or loaded; the message says why."""


class RunFolderError(TlkitError, FileNotFoundError):
    """A path given as a run folder is not one."""


class UnsafeCheckpointError(TlkitError, ValueError):
    """A checkpoint holds more than tensors and plain data: it is refused, never unpickled."""


class SearchError(TlkitError, ValueError):
    """A search cannot go on as asked: no completed trial, or a different base config."""


class TrainingDivergedError(TlkitError, RuntimeError):
    """The loss became NaN or infinite; the message names where and what to try."""
