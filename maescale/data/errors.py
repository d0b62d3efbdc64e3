"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(Exception):
    """A data problem that stops the run: a bad ``data.*`` setting, a shard pattern that matches
    nothing, an unknown epoch size, or more undecodable samples than ``data.max_bad_fraction``.

    The message always names what is wrong (the config key, the pattern or the shard) and what to
    do about it. ``key`` holds the offending config key when there is one.
    """

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(message)

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (str(self), self.key))
