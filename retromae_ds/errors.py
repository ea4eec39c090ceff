"""One exception type for mistakes the user can fix.

The CLI prints its message as one paragraph and exits with code 2, with no traceback: a
UserError message must name the file/field at fault and say how to fix it.
"""


class UserError(Exception):
    """Bad input or configuration; the message tells the user what to change."""
