"""A job's states, in a module of their own that imports nothing: the CLI's ``recast jobs`` offers them
without loading the Redis client that the job store needs."""

STATES = ("queued", "running", "verifying", "uploading", "succeeded", "failed", "cancelling", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("running", "verifying", "uploading")
