"""One exception type for mistakes the user can fix (bad recipe, path, data, request).

Scripts catch it at the top (see ``utils.cli.main_guard``) and print the message
without a traceback; anything else is a bug and raises normally.
"""


class UserError(Exception):
    """A problem with the user's input. The message names the thing and the fix."""
