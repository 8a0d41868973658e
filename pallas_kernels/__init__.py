"""Pallas Mosaic GPU kernels for DWDP: grouped expert GEMM and remote expert DMA."""
