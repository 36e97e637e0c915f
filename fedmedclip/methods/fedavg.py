"""FedAvg (docs/algorithms.md §4): CLIP's image and text encoders fine-tuned at every site with the contrastive
loss L_con; the whole trainable model is averaged by training-set size each round.
Options and settings: see fedmedclip/methods/finetune.py (lr 5e-5, weight_decay 0.02, local_steps 199)."""

from __future__ import annotations

from .finetune import FineTuneMethod


class FedAvg(FineTuneMethod):
    name = "fedavg"
