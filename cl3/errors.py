"""One exception hierarchy. The CLI turns any Cl3Error into a one-line message and a non-zero exit code."""


class Cl3Error(Exception):
    """Base class: a problem the user can act on (bad input, missing file, unsupported model).

    ``param`` names the library parameter the problem is about (e.g. ``"imatrix"``); front ends translate it into
    their own spelling (the CLI adds "see --imatrix"), so library messages never name command-line flags.
    """

    exit_code = 1

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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


class OutputExistsError(OutputError):
    """An output file is already there and replacing it was not asked for."""

    def __init__(self, path) -> None:
        self.path = path
        super().__init__(f"{path} already exists", param="force")


class Interrupted(Cl3Error):
    """The user stopped a run (Ctrl-C); the message says what was kept."""

    exit_code = 130
