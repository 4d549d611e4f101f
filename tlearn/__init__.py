"""tlearn: transfer learning on image folders from the terminal."""

__version__ = "0.1.0"
