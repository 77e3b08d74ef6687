"""Masks as text: the VQ-VAE (`vqvae`, vae-oid.npz format) and the mask <-> suffix `codec`.

Importing the package (or `codec`) does not import JAX, so data-conversion workers stay light;
`from paligemma_seg.segtokens import vqvae` loads the network.
"""

from paligemma_seg.segtokens import codec
from paligemma_seg.segtokens.codec import (
    CodecConfig,
    DecodedMask,
    EncodedMask,
    MaskCodec,
    join_objects,
    parse_suffix,
    reference_mask,
    split_objects,
)

__all__ = [
    "CodecConfig",
    "DecodedMask",
    "EncodedMask",
    "MaskCodec",
    "codec",
    "join_objects",
    "parse_suffix",
    "reference_mask",
    "split_objects",
]
