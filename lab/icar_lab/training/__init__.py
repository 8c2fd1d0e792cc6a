"""Training's building blocks: the embedded CLIP model, the distillation targets, the shared loop
(checkpoints, held-out epoch choice, precision), the exit heads and the tuned tails."""
