"""Errors raised at the library's boundary.

The CLI catches :class:`BonsaiPruneError`, prints its message on one line and exits with
code 2. Anything else escaping the library is a bug, not a user mistake.
"""


class BonsaiPruneError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ConfigError(BonsaiPruneError, ValueError):
    """A configuration value is out of range or unknown."""


class UnsupportedModelError(BonsaiPruneError):
    """The model's architecture has no adapter."""


class ModelLoadError(BonsaiPruneError):
    """The model spec does not point at a loadable model."""


class DataError(BonsaiPruneError):
    """A data file is missing, empty or malformed."""


class RunDirectoryError(BonsaiPruneError):
    """The output directory cannot be used as asked (exists, incomplete, corrupt)."""


class PruningError(BonsaiPruneError):
    """A run cannot continue (every sub-model failed, target unreachable)."""


class MemoryBudgetError(BonsaiPruneError):
    """The work would not fit in the free memory, whatever it is split into."""
