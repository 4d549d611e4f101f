"""Features of images at a cut: the one engine choice (warm or cold, ONNX Runtime or
torch), the feature stream through the on-disk cache, and feature tables on disk."""
