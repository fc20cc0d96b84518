"""The one error tree of captrain.

Every error captrain raises on purpose is a ``CaptrainError``; the CLI prints its
message on one line and exits non-zero, with no traceback.

    CaptrainError
    ├── ConfigError        bad CAPTRAIN_* settings or an unreachable service
    ├── SpecError          a malformed job spec (count, charset, split, ...)
    ├── NotFound           an unknown job, run, dataset or model id or name
    ├── InputError         a file given by the user that cannot be read
    │                      (not an image, truncated, a decompression bomb, ...)
    ├── ArtifactError      a stored artifact is missing or fails its sha256 check
    ├── StateError         an operation that the current state forbids
    │   │                  (training on a dataset that is not ready, ...)
    │   ├── LeaseLost      another process took over a run this one trained
    │   └── Cancelled      the user cancelled the job a task is working on
    ├── StopRequested      a warm shutdown: training checkpointed and stops
    ├── Pruned             a sweep's pruner stopped a trial at an epoch's end
    └── TransientError     a lost database or broker connection; tasks retry it
        ├── DatabaseUnavailable
        └── BrokerUnavailable

Library errors (SQLAlchemy, redis, CUDA) are wrapped where they enter, with
``raise X(...) from exc``, so callers only catch this tree.
"""

from __future__ import annotations


class CaptrainError(Exception):
    """Base of every error that captrain raises deliberately."""

    exit_code = 1


class ConfigError(CaptrainError):
    """Settings are invalid, or a configured service cannot be reached."""

    exit_code = 3


class SpecError(CaptrainError):
    """A job spec failed validation; nothing was written."""

    exit_code = 2


class NotFound(CaptrainError):
    """No job, run, dataset or model has the given id or name."""

    exit_code = 4


class InputError(CaptrainError):
    """A user-supplied file cannot be used."""

    exit_code = 5


class ArtifactError(CaptrainError):
    """An artifact is missing, truncated, or its bytes do not match its sha256."""

    exit_code = 6


class StateError(CaptrainError):
    """The requested operation does not fit the current state of a record."""

    exit_code = 7


class LeaseLost(StateError):
    """Another process took over this run (this one was silent for too long)."""


class Cancelled(StateError):
    """The job was cancelled; the task stops at its next checkpoint or shard boundary."""


class StopRequested(CaptrainError):
    """Training was asked to stop between batches (a warm shutdown of its worker); a
    checkpoint was saved first, and the message goes back to the queue."""

    exit_code = 9


class Pruned(CaptrainError):
    """A sweep's trial fell below its pruner's bar at an epoch's end (whose metrics
    and checkpoint are stored): the run stops there, marked pruned."""

    exit_code = 1


class TransientError(CaptrainError):
    """A failure that may go away on retry (a dropped connection)."""

    exit_code = 8


class DatabaseUnavailable(TransientError):
    """The SQL database could not be reached or dropped the connection."""


class BrokerUnavailable(TransientError):
    """The Redis broker could not be reached."""
