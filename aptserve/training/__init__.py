"""APT training recipe: data, diffusion pre-training, consistency distillation, adversarial post-training."""
