"""One error type for everything a user can get wrong (DESIGN.md section 8).

A :class:`NormdeployError` carries one line that says what is wrong and what to do;
the CLI prints it without a traceback (unless ``--debug``) and exits with ``exit_code``.
"""
from __future__ import annotations


class NormdeployError(Exception):
    """A user-facing failure: ``message`` says what is wrong, ``hint`` what to do."""

    exit_code = 2

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message, self.hint = message, hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class InputError(NormdeployError):
    """The model file, its data or a flag is unusable."""


class UnsupportedError(NormdeployError):
    """The model uses something normdeploy cannot handle."""

    exit_code = 3


class AccuracyError(NormdeployError):
    """The optimized model does not compute what the original did within tolerance."""

    exit_code = 4
