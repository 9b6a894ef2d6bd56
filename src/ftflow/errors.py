"""ftflow's two kinds of expected failure: both end in their message alone, no traceback."""


class ConfigError(ValueError):
    """A config problem, with the dotted path of the offending key in the message."""


class StageError(Exception):
    """Bad input that a stage reports with what to do about it: `ftflow` prints the message
    alone, no traceback (the stages' own error classes derive from it)."""


class PackError(StageError):
    """pack: data it cannot turn into token rows (its modules share it)."""
