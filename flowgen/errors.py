"""The one exception type for mistakes a user can fix; the entry points print it as one line."""


class UserError(Exception):
    """A mistake in the command line, the config, the files or the run's state that the user can fix."""
