"""The one exception type users see: a one-line message that says what is wrong and what to do."""


class JaxregError(Exception):
    """Bad input or configuration. The CLI prints ``str(err)`` on one line and exits non-zero."""


class InputError(JaxregError):
    """An input file or array cannot be used (missing, unreadable, wrong shape, non-finite...)."""


class ConfigError(JaxregError):
    """An unknown preset, an unknown key or an invalid value in a configuration."""


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): how a failure of one
    pair is reported beside the others, e.g. in a batch's run log."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
