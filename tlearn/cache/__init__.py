"""The on-disk cache (torch-free): features per cut and image content, exported ONNX
graphs' folder, and what a request resolved to (remembered for warm runs); info/clear."""
