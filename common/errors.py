"""One small hierarchy of exceptions, each with a message a person can act on."""

from __future__ import annotations


class FedsiloError(Exception):
    """Base class of every error fedsilo raises on purpose."""


class ConfigError(FedsiloError, ValueError):
    """A setting is missing, malformed or out of range."""


class SchemaError(FedsiloError, ValueError):
    """A federation schema file is itself malformed."""


class DataError(FedsiloError, ValueError):
    """An institution's data does not fit the federation's schema."""


class LedgerError(FedsiloError):
    """A privacy ledger cannot be read or written safely."""


class TrainerError(FedsiloError, RuntimeError):
    """An institution's warm trainer (``fedsilo.client.trainer``) failed, or answered with an error."""


class TrainerUnavailable(TrainerError):
    """The warm trainer could not be reached, or went away before it answered."""
