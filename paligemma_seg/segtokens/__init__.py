"""Masks as text: the VQ-VAE (`vqvae`) and the mask <-> suffix codec (`codec`)."""
