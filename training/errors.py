"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """A mistake in what the user asked for (bad path, unknown version, wrong layout...)."""
