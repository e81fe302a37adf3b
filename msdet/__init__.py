"""msdet: EfficientDet-D0 and NanoDet-Plus-m object detection with MindSpore, driven by DVC."""
__version__ = "0.15.0"
