"""Inference: the token grammar (`grammar`), batched greedy decoding with a KV cache (`decode`),
the engine from images to masks (`segmenter`) and scoring a split (`evaluation`)."""
