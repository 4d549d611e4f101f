"""tlearn: transfer learning on image folders from the terminal."""

from tlearn.core.version import __version__ as __version__
