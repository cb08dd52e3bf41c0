"""A training engine for ResNeXt on hashtag-labelled images, with fused kernels."""

__version__ = "0.1.0"
