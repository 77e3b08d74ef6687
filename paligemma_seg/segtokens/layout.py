"""The mask-token layout: the one home of PaliGemma's `<loc>`/`<seg>` counts and separators.

No imports: the tokenizer, the codec, the VQ-VAE and the decoding grammar all read these.
An object is `<loc>`x4 (y1 x1 y2 x2) then `<seg>`x16, then its label; objects are joined by " ; ".
"""

NUM_LOC_BINS = 1024  # <loc0000>..<loc1023>: a box edge quantised over the image side.
NUM_CODES = 128  # Codebook entries: <seg000>..<seg127>.
LOCS_PER_BOX = 4  # y1 x1 y2 x2.
TOKENS_PER_MASK = 16  # Codes per object: a 4x4 grid, row-major.
TOKENS_PER_OBJECT = LOCS_PER_BOX + TOKENS_PER_MASK
MASK_SIZE = 64  # Side of the box crop the VQ-VAE encodes.
OBJECT_SEPARATOR = " ; "


def loc_token(bin_index: int) -> str:
    """`<locNNNN>` of a bin in [0, NUM_LOC_BINS)."""
    return f"<loc{int(bin_index):04d}>"


def seg_token(code: int) -> str:
    """`<segNNN>` of a code in [0, NUM_CODES)."""
    return f"<seg{int(code):03d}>"
