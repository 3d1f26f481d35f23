"""Exceptions with messages that name the problem and the fix."""


class OmnitalkError(Exception):
    """Base class of every error omnitalk raises on purpose."""


class CheckpointError(OmnitalkError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


class InputError(OmnitalkError, ValueError):
    """A user input (audio, image, text, option) cannot be used."""
