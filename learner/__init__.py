"""Learner side: replay buffer, packing, loss, DeepSpeed trainer, weight publisher, checkpoints."""
