"""The mask-token layout shared by the VQ-VAE and the codec (no JAX here)."""

NUM_CODES = 128  # Codebook entries: <seg000>..<seg127>.
TOKENS_PER_MASK = 16  # Codes per object: a 4x4 grid, row-major.
MASK_SIZE = 64  # Side of the box crop the VQ-VAE encodes.
