"""Callbacks for training loops the user does not write, on `HybridCheckpointer.attach`:
`offload.integrations.hf.OffloadCallback` (Hugging Face `Trainer`) and
`offload.integrations.lightning.OffloadCallback` (PyTorch Lightning). Each module imports its
framework; `import offload` imports neither."""
