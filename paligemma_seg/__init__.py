"""paligemma_seg: fine-tune PaliGemma 1/2 in JAX/Flax for segmentation, with real masks back."""

__version__ = "0.1.0"
