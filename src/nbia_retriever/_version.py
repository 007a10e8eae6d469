"""The package version, in a module of its own: ``api.http`` (the User-Agent) and the CLI
need it without importing the package's ``__init__`` (an import cycle)."""

__version__ = "0.1.0"
