"""Exceptions that carry a one-line message for the user (the CLI prints them and exits with status 2)."""


class AirRegError(ValueError):
    """Bad input or a failed precondition; the message names what was wrong and where."""


class InputError(AirRegError):
    """An input file, image, transform or node cannot be used."""


class ModelError(AirRegError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the requested use."""
