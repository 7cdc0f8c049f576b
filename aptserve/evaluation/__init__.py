"""Evaluation of text-to-video systems on held-out shapes prompts: adherence, Frechet distance, sharpness."""
