"""Masks as text: the VQ-VAE (`vqvae`, vae-oid.npz format) and the mask <-> suffix `codec`."""

from paligemma_seg.segtokens import codec, vqvae
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
from paligemma_seg.segtokens.vqvae import VQVAE

__all__ = [
    "VQVAE",
    "CodecConfig",
    "DecodedMask",
    "EncodedMask",
    "MaskCodec",
    "codec",
    "join_objects",
    "parse_suffix",
    "reference_mask",
    "split_objects",
    "vqvae",
]
