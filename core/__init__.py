"""PETLab core: parameter-efficient fine-tuning of timm Vision Transformers, and the analyses around it."""

__version__ = "0.1.0"
