"""torch inference on the cut network: channels_last, fp16 autocast on CUDA, and uint8
pixel input normalised on the device."""

from __future__ import annotations

import numpy as np
import torch

# ----------------------------------------------------------------------------- runtimes


class PixelInput(torch.nn.Module):
    """uint8 NHWC pixels -> ToTensor + Normalize arithmetic -> the feature network."""

    def __init__(self, net: torch.nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # permute gives a channels_last view; the float math is ToTensor's and Normalize's.
        x = pixels.permute(0, 3, 1, 2).float().div(255)
        return self.net(x.sub(self.mean).div(self.std))


def example_input(data_config: dict, n: int, pixels: bool, random: bool = False):
    c, h, w = data_config["input_size"]
    g = torch.Generator().manual_seed(0)
    if pixels:
        if random:
            return torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=g)
        return torch.zeros(n, h, w, c, dtype=torch.uint8)
    return torch.randn(n, c, h, w, generator=g) if random else torch.zeros(n, c, h, w)


class TorchRuntime:
    """torch inference: channels_last (faster for convolutions on CPU and CUDA) and fp16
    autocast on CUDA. With `pixels` (transform, mean, std) it takes uint8 NHWC batches and
    normalises them on the device (on a GPU: 4x less to copy over PCIe)."""

    name = "torch"

    def __init__(self, net: torch.nn.Module, device: torch.device, pixels=None):
        self.device = device
        self.transform = None
        if pixels is not None:
            self.transform = pixels[0]
            net = PixelInput(net, pixels[1], pixels[2])
        self.channels_last = device.type in ("cpu", "cuda")
        self.amp = device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels
        net = net.to(device).eval()
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if isinstance(x, np.ndarray):  # uint8 pixels from tlearn.decode
            x = torch.from_numpy(x)
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4 and x.dtype != torch.uint8:
            x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.amp),
        ):
            y = self.net(x)
        return y.float().cpu().numpy()
