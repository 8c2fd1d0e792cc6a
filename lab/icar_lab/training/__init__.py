"""Training jobs' building blocks: the embedded CLIP model, the exit heads and the tuned tails."""
