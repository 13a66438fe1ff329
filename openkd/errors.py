"""The one exception type users see: a one-line problem plus the fix."""


class OpenkdError(Exception):
    """A user-facing failure. `str(err)` is printed as one line and the process exits non-zero."""

    exit_code = 1


class ConfigError(OpenkdError):
    """Bad configuration or flags, found before any expensive work starts."""

    exit_code = 2
