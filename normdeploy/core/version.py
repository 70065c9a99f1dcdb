"""The package version, in one place (read by the root package and the report)."""

__version__ = "0.1.0"
