"""Data: reading files (`images`), generated tiles (`synthetic`), images/masks -> JSONL
(`convert`), JSONL -> batches (`pipeline`, imported on its own: it loads TensorFlow). Conversion:
`from paligemma_seg.data.convert import convert` (the module and the function share the name)."""

from paligemma_seg.data.images import ImageReadError, read_image, read_mask
from paligemma_seg.data.synthetic import generate

__all__ = [
    "ImageReadError",
    "generate",
    "read_image",
    "read_mask",
]
