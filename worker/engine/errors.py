"""Errors the engine raises for bad input: each names the file, key or field and what to do."""


class RecastError(Exception):
    """A conversion problem a person can act on; the CLI prints it without a traceback."""

    code = "recast_error"


class CheckpointError(RecastError):
    """The source checkpoint is malformed (truncated shard, bad header, missing scale...)."""

    code = "bad_checkpoint"


class UnsupportedModelError(RecastError):
    """No adapter matches the checkpoint's architecture."""

    code = "unsupported_model"


class AdapterMismatchError(RecastError):
    """The chosen adapter's rules do not account for the checkpoint (a wrong override).

    Verification checks the output against the plan the adapter made, so a wrong adapter would pass it;
    the mismatch has to be caught while planning, before anything is written.
    """

    code = "adapter_mismatch"


class TargetExistsError(RecastError):
    """The destination already holds a checkpoint and --overwrite was not given."""

    code = "target_not_empty"


class TargetBusyError(RecastError):
    """Another job is writing to the same destination right now."""

    code = "target_busy"


class VerificationError(RecastError):
    """The round-trip check failed; nothing was published."""

    code = "verification_failed"

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
