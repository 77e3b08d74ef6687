"""paligemma_seg: fine-tune PaliGemma 1/2 in JAX/Flax for segmentation, with real masks back.

    from paligemma_seg import Segmenter
    seg = Segmenter.from_pretrained("runs/water_tiny")  # a workdir, checkpoint, .npz or HF dir
    result = seg.predict("lake.jpg", prompt="segment water")  # .mask, .boxes, .labels, .masks

`Segmenter` is imported on first use, so `import paligemma_seg.cli` (every command line) does not
pull in the inference stack before the command has set up logging.
"""

import os

__version__ = "0.1.0"
__all__ = ["Segmenter"]

# TensorFlow (only the input pipeline uses it) prints C++ start-up lines on import ("oneDNN
# custom operations are on", "All log messages before absl::InitializeLog()"); TF_CPP_MIN_LOG_LEVEL
# alone no longer hides the first. oneDNN only changes TF's CPU math kernels, which the pipeline
# (decode, resize) does not use. Set before anything imports TensorFlow; the environment wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def __getattr__(name: str):
    if name == "Segmenter":
        from paligemma_seg.infer.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'paligemma_seg' has no attribute {name!r}")
