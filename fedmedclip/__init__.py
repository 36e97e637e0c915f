"""fedmedclip: federated adaptation of a frozen CLIP for medical image classification."""

__version__ = "0.1.0"
