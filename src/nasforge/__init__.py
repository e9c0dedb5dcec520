"""nasforge: hardware-aware NAS and compression as a Kubeflow pipeline."""

__version__ = "0.1.0"
