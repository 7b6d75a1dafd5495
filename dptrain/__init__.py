"""dptrain: privacy-preserving training for PyTorch (DP-SGD, robust federated learning, privacy audits)."""

__version__ = "0.1.0"
