"""Errors that trap2 raises on bad input: one line, naming what was wrong and what is valid."""

from __future__ import annotations


class Trap2Error(ValueError):
    """Base class: bad configuration, input file or request. The CLI prints it as one line."""


class ConfigError(Trap2Error):
    """A configuration value is out of range, unknown or inconsistent."""


class UpdateFileError(Trap2Error):
    """An update or checkpoint file is missing, corrupt, unsafe or does not match its base."""


class UnknownNameError(Trap2Error):
    """A name (objective, suite, merge method, task) is not registered."""


class TrainingError(Trap2Error):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""


class DataError(Trap2Error):
    """A dataset is missing, unreadable or malformed; the message names the install or prepare command."""
