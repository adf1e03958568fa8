"""The errors a user can fix. The CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing or wrong file, a bad config value. The message names the problem and what to do."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run stopped after its current unit and can be resumed (exit code 3)."""
