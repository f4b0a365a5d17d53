"""The one exception type STI raises for bad input: it names the problem and the fix."""


class STIError(Exception):
    """A user-facing error. ``str(err)`` says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
