"""The package version, in one place: the build (pyproject.toml) and the package read it from here."""

__version__ = "0.2.0"
