"""train: Hydra recipes and a gradient-cached, multi-process trainer for text-embedding models."""

__version__ = "0.1.0"
