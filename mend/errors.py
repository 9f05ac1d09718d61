"""User-facing errors: commands print them as one line and exit with code 2."""


class MendError(Exception):
    """Bad input or an unsupported situation that the user can fix; never a bug."""


class ConfigError(MendError):
    """A config file or a key=value override is invalid."""


class ModelLoadError(MendError):
    """A model name, alias or path cannot be loaded."""


class UnsupportedArchitecture(MendError):
    """No adapter exists for the model's class."""


class RequestError(MendError):
    """An edit request is malformed."""
