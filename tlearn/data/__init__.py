"""Image folders, label CSVs and plain inputs; reading and decoding images; the skipped
list. Torch-free: decoding workers and warm runs use it without importing torch."""
