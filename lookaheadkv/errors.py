"""The one exception type users see: a one-line message naming the problem and what to do."""


class LookaheadKVError(Exception):
    """Bad input or a failed check; the CLI prints it as one line and exits non-zero."""
