"""Training jobs' building blocks: the embedded CLIP model and the exit heads."""
