"""The one exception type for user mistakes.

The CLI prints a ``UserError`` as a single line and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: the message names the file or field and says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always one line
