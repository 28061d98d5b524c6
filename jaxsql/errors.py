"""User-facing errors: one clear message and a non-zero exit from the CLI."""


class JaxsqlError(Exception):
    """An error the user can cause and fix (bad file, bad config, bad data).

    The CLI prints ``error: <message>`` to stderr and exits with `exit_code`.
    """

    exit_code = 1


class UsageError(JaxsqlError):
    """A command line that does not make sense (exit status 2)."""

    exit_code = 2


class ConfigError(JaxsqlError):
    """A configuration value that fails validation; the message names the field."""

    exit_code = 2
