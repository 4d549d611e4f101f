"""Pretrained backbones (torch + timm): weights and model loading, the layers where a
network can be cut, the cut network with the one pooling, and the trainable network
(cut backbone + new head) that fine-tuning uses."""
