"""The one exception type springfield raises for mistakes a user can fix."""


class SpringfieldError(Exception):
    """A user-facing error: the message names the file or flag at fault and the fix.

    The CLI prints it in one or two lines, without a traceback, and exits non-zero.
    """


class BadImageError(SpringfieldError):
    """A file that is not a decodable image (or one springfield refuses to decode)."""


class Interrupted(SpringfieldError):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint.

    The CLI prints the message (how to resume) and exits with status 130, as shells expect
    after Ctrl-C.
    """
