"""CCNet (criss-cross attention for semantic segmentation) on Jittor."""

__version__ = "0.1.0"
