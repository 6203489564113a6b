"""The errors this package raises on purpose, and how a command tells them.

Each message names the file, key, field, port or rank at fault and says what to do next,
so that a user reading a job log can act without opening the source.
"""

import sys


class DDPError(Exception):
    """Base class of every error raised on purpose by this package."""


class ConfigError(DDPError, ValueError):
    """A setting is invalid; raised before any process group starts."""


class CheckpointError(DDPError):
    """A checkpoint or weights file could not be written or read."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The file or checkpoint folder does not exist."""


class CheckpointCorruptError(CheckpointError):
    """The file is truncated, altered, or disagrees with its manifest."""


class CheckpointFormatError(CheckpointError):
    """The file is not in the format expected (or not a checkpoint at all)."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled objects that the weights-only loader refuses to run."""


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, permission denied, ...); the previous file is intact."""


class ArchitectureMismatchError(CheckpointError):
    """A state_dict does not fit the model: missing keys, unexpected keys, wrong shapes."""


class DistributedError(DDPError):
    """A rank failed or disagreed with the others during a collective step."""


class NonFiniteError(DDPError):
    """A loss or gradient norm became NaN or infinite; training stopped before the update."""


class VerifyError(DDPError):
    """Ranks gave different outputs after reloading the saved weights."""


class Reported(Exception):
    """An error whose message this rank printed before leaving its process group.

    Said there because once one rank exits, the launcher kills the others: a rank still
    leaving the group (which can take a while on a loaded host) died with its message
    unsaid. Carries the exit code; deliberately not a DDPError, so no handler prints it again.
    """

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line reports."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def say(lead: str, e: DDPError) -> int:
    """Print ``e`` on stderr as one line after ``lead``; its exit code (2 for a usage error)."""
    print(f"{lead} error: {e}", file=sys.stderr, flush=True)
    return 2 if isinstance(e, ConfigError) else 1
