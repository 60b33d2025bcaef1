"""One exception hierarchy. The CLI turns any Cl3Error into a one-line message and a non-zero exit code."""


class Cl3Error(Exception):
    """Base class: a problem the user can act on (bad input, missing file, unsupported model)."""

    exit_code = 1


class UsageError(Cl3Error):
    """The command line asks for something that cannot be done (unknown type, conflicting options)."""

    exit_code = 2


class InputError(Cl3Error):
    """An input file or directory is missing, unreadable, corrupt or of an unsupported kind."""


class UnsupportedModelError(InputError):
    """The model's architecture, tokenizer or layout is one cl3 does not handle."""


class OutputError(Cl3Error):
    """The output cannot be written (directory missing, not writable, disk full)."""


class LlamaError(Cl3Error):
    """llama.cpp refused or failed an operation (load, eval, quantize)."""
