"""The package version (one place; tlearn.__version__ re-exports it)."""

__version__ = "0.1.0"
