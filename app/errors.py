"""Exceptions of the appliance: every one names the file (or bundle) and the problem."""
from __future__ import annotations

import os


class Flare22Error(Exception):
    """Base class of the project's own errors."""


class InputError(Flare22Error):
    """A CT or label file that cannot be used as given."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.path, self.problem))


class GeometryError(Flare22Error):
    """An array that does not lie on the grid it must be written onto."""


class BundleError(Flare22Error):
    """A model bundle that is missing, damaged or of an unknown format."""

    def __init__(self, bundle: str | os.PathLike, problem: str):
        self.bundle = str(bundle)
        self.problem = problem
        super().__init__(f"model bundle {self.bundle}: {problem}")

    def __reduce__(self):
        return (type(self), (self.bundle, self.problem))
