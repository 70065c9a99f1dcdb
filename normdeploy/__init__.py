"""normdeploy: deploy models whose normalization layers cost inference time."""

__version__ = "0.1.0"
