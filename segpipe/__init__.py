"""segpipe: 3D lesion segmentation for brain MRI with the boundary loss under a weight schedule."""

__version__ = "0.1.0"

__all__ = ["__version__"]
