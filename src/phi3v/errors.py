"""The one exception type phi3v raises for mistakes a user can fix."""


class Phi3VError(ValueError):
    """A user error: a bad image, prompt, option or checkpoint.

    The message is one line that says what is wrong and how to fix it; front ends print it without a
    traceback (the CLI) or return it as a 4xx error (the server).
    """


class TooLarge(Phi3VError):
    """An input over a size limit (bytes or pixels); the server answers 413."""
