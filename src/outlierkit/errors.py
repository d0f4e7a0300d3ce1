"""One error hierarchy: every user mistake is an ``OutlierkitError`` with a one-line, actionable message."""

from __future__ import annotations


class OutlierkitError(Exception):
    """Base class for errors caused by user input; the CLI prints the message on one line and exits 2."""


class ConfigError(OutlierkitError, ValueError):
    """A config, recipe key, option value or override is invalid."""


class DataError(OutlierkitError, ValueError):
    """Input data is missing, empty, binary, malformed or inconsistent."""


class ModelLoadError(OutlierkitError):
    """A model directory is missing, corrupt, lacks a tokenizer, or cannot be loaded offline."""


class UnsupportedArchitectureError(OutlierkitError):
    """An operation needs an architecture mapping that is missing; the message says how to add one."""


class OutputExistsError(OutlierkitError):
    """The output directory exists and ``--force`` was not given."""


class NumericalError(OutlierkitError):
    """NaN/Inf values were found where finite numbers are required."""


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup failed; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""
