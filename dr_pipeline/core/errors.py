"""Errors a user sees as one clear line (the CLI prints them without a traceback)."""


class DrGenError(Exception):
    """Base of every error dr-gen reports to the user as one line."""


class ConfigError(DrGenError):
    """The job config, a teacher spec, the input or the output is unusable; nothing was computed."""


class DatasetError(DrGenError):
    """An output folder is missing, unreadable, or of an unknown schema version."""


def one_line(error: BaseException) -> str:
    """The last meaningful line of an error, as users should see it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
