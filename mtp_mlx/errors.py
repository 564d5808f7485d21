"""User-facing errors: one line, naming the thing and the fix."""


class MtpError(Exception):
    """An expected error caused by user input (bad path, incompatible pair, bad flag).

    The CLI prints ``str(err)`` on one line and exits non-zero without a traceback.
    """
