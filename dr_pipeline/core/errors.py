"""Errors a user sees as one clear line (the CLI prints them without a traceback)."""


class DrGenError(Exception):
    """Base of every error dr-gen reports to the user as one line."""


class ConfigError(DrGenError):
    """The job config, a teacher spec, the input or the output is unusable; nothing was computed."""


class DatasetError(DrGenError):
    """An output folder is missing, unreadable, or of an unknown schema version."""


def error_line(error: BaseException, *, part: str = "whole", with_type: bool = False, limit: int | None = None) -> str:
    """An exception as the one line a user reads: in a message, a failure detail or a report.

    part: "whole" joins the message's lines with single spaces; "last" keeps its last non-blank
    line (a Ray task error carries the remote traceback, and ends with the error itself); "first"
    its first non-blank line. Without a message, the exception's class name stands for it.
    with_type: the class name first ("OSError: message"). limit: at most that many characters,
    a cut line ending in "...".
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if part == "whole":
        message = " ".join(" ".join(lines).split())
    elif part in ("first", "last"):
        message = lines[0 if part == "first" else -1] if lines else ""
    else:
        raise ValueError(f"part must be whole, first or last, got {part!r}")
    name = type(error).__name__
    text = (f"{name}: {message}" if message else name) if with_type else (message or name)
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
