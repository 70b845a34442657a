"""Errors of the data pipeline: a wrong setting, or data with nothing usable left."""


class DataConfigError(ValueError):
    """A data setting that cannot work: the message names the field, the value and what is allowed."""


class NoUsableDataError(DataConfigError):
    """Every sample of a full epoch was skipped (corrupt images, empty captions): there is nothing to train on."""
