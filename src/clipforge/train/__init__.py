"""Training: the paper's contrastive recipe (see docs/training.md)."""
