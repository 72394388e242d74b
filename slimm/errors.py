"""Errors that name the problem: the CLI prints them as one line and exits 2."""


class SliMMError(ValueError):
    """Base class: bad input or a bad file, described in words a user can act on."""


class CheckpointError(SliMMError):
    """A checkpoint directory, config file or tensor is missing, corrupt or mis-shaped."""


class InputError(SliMMError):
    """A prompt, image, video or generation setting that cannot be used."""


class BackendUnavailable(SliMMError):
    """A backend whose framework is not installed, or that cannot run what was asked."""
