"""The movers: the transfer contract, its CUDA-stream and CPU-emulation backends, the pinned host
pool and the link probe."""
