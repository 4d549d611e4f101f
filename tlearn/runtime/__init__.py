"""Running the cut network: ONNX Runtime (torch-free, runtime.ort) and torch, the ONNX
export, device and backend choice, the eval/augmentation/TTA transforms and torch's
DataLoader over images."""
