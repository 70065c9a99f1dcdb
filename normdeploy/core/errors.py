"""One error type for everything a user can get wrong (DESIGN.md section 8).

A :class:`NormdeployError` carries one line that says what is wrong and what to do;
the CLI prints it without a traceback (unless ``--debug``) and exits with ``exit_code``.

Exit codes of every command: 0 success; 1 ``gate``: a check failed; 2 bad input
(:class:`InputError`, and command-line usage errors); 3 unsupported (:class:`UnsupportedError`);
4 accuracy above tolerance (:class:`AccuracyError`); :data:`EXIT_INTERNAL` (70, BSD's
``EX_SOFTWARE``) an internal error, a bug in normdeploy, distinct from every verdict above so
that a crash never reads as a failed check in CI; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""
from __future__ import annotations


#: exit status of an internal error (an exception that is not a NormdeployError): sysexits.h EX_SOFTWARE
EXIT_INTERNAL = 70
#: exit status after Ctrl-C (128 + SIGINT) and after SIGTERM (128 + SIGTERM)
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


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
