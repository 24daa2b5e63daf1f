"""The errors a user can cause, which the launchers turn into one `error: ...` line (see `cli`)."""


class CheckpointError(Exception):
  """A checkpoint path or content that cannot be used; the message says why and what to do."""


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint whose arrays are not those of the model the config builds (a config or code change)."""


class TrainingError(RuntimeError):
  """A run that cannot continue (e.g. too many consecutive skipped updates); the message says why."""


class DataSourceError(ValueError):
  """An image source (folder, array file, tfds: spec) that cannot be read; the message names it and the fix."""
