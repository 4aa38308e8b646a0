"""The error type for bad input a person can fix (a missing column, an unknown key, tables that do not
fit): commands print its message alone and exit non-zero, while real bugs keep their traceback."""


class InputError(ValueError):
    """Bad input recognised by the code; the message names the file, row or field, what was expected
    and what was found."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what it should be)."""


class ExistingOutputError(InputError, FileExistsError):
    """An output would overwrite something the user did not ask to replace."""
