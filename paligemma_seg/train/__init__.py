"""Training: `python -m paligemma_seg.train` (`__main__`), the loop (`loop`), what a run builds
before its first step (`setup`), the pure step (`step`), the loss (`loss`: next-token
cross-entropy, soft `<loc>`/`<seg>` targets), the optimizer and trainable masks (`optim`) and
orbax checkpoints (`checkpoint`)."""

from paligemma_seg.train.loss import next_token_loss
from paligemma_seg.train.step import TrainState, make_eval_step, make_train_step

__all__ = ["TrainState", "make_eval_step", "make_train_step", "next_token_loss"]
