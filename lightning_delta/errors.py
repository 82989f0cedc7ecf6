"""Error types. Each one subclasses the builtin a caller would naturally catch."""


class DeltaError(Exception):
    """Base class of every error lightning_delta raises on purpose."""


class TargetError(DeltaError, ValueError):
    """A target pattern matched no module, or every match was excluded."""


class UnsupportedModuleError(DeltaError, TypeError):
    """A method was asked to attach to a module type it cannot handle."""


class DeltaConfigError(DeltaError, ValueError):
    """An unknown method, an unknown hyper-parameter or a value out of range."""


class MergeError(DeltaError, RuntimeError):
    """``merge()`` or ``unmerge()`` asked of a delta that cannot do it."""


class DeltaStateError(DeltaError, ValueError):
    """A delta state dict or checkpoint does not fit the model it is loaded into."""


class CheckpointReadError(DeltaError, OSError):
    """A checkpoint file is missing, truncated, corrupt or not a checkpoint."""


class ModelLoadError(DeltaError, OSError):
    """A pretrained model or tokenizer could not be loaded from its name or folder (offline, misspelt, missing)."""


class NonFiniteError(DeltaError, FloatingPointError):
    """A loss or a delta tensor became NaN or infinite (training stops; nothing non-finite is saved)."""
