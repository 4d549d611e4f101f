"""The bottom layer: errors, CutSpec, RunOptions, hashes, atomic files and system facts.

Plain Python and numpy only (no torch, timm or torchvision: an import contract in the
test suite keeps it so), importable by every other package."""
