"""The one exception type that means "the user gave us something we cannot use"."""


class SRDError(Exception):
    """Bad input: a missing file, a bad flag value, a checkpoint that does not fit.

    Entry points turn it into a one-line ``error: ...`` message and exit status 2.
    The message should name the offending file or flag.
    """
