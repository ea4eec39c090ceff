"""One exception type for mistakes the user can fix, and the folder check every writer shares.

The CLI prints its message as one paragraph and exits with code 2, with no traceback: a
UserError message must name the file/field at fault and say how to fix it.
"""


class UserError(Exception):
    """Bad input or configuration; the message tells the user what to change."""


def make_folder(folder: str, for_what: str) -> None:
    """Create `folder` and its parents, or say which one cannot be made and for what (a flag and its value)."""
    import os

    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the folder {folder} for {for_what}: {err.strerror}. Choose a writable "
                        f"location.") from None
