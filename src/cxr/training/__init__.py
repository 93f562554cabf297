"""Fitting a model: architectures, augmentation, the epoch engine, the training loop, runtime and DDP."""
