"""Errors a user can cause: each kind is a HorizonError whose one-line message says what was wrong
and how to fix it. The CLI prints them without a traceback and exits 2."""

from kernels.errors import KernelInputError


class HorizonError(Exception):
    """Base of every error a user can fix (bad config, data, checkpoint, shapes at an API)."""


class ConfigError(HorizonError, ValueError):
    """An experiment or component config holds an invalid value."""


class DataError(HorizonError):
    """A token store or data source is missing, corrupt, or does not match what was asked."""


class CheckpointError(HorizonError):
    """A checkpoint is missing, corrupt, or was written for a different model."""


class ShapeError(HorizonError, ValueError):
    """Arrays passed to a public function have shapes or dtypes it cannot take."""


class NonFiniteError(HorizonError, ValueError):
    """A tensor to quantize holds NaN or inf (its scale would be meaningless)."""


class ExperimentNotFound(HorizonError):
    """`horizon run NAME` named no experiment module."""


# Errors from kernels/ (which imports nothing from horizon) are user errors too.
USER_ERRORS = (HorizonError, KernelInputError)
