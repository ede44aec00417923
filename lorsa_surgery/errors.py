"""The one exception type the library raises for bad input; the CLI prints its message as one line."""


class LorsaSurgeryError(ValueError):
    """A problem with what the user asked for: a missing file, a bad shape, an unknown head."""
