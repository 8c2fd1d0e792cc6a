"""Stage 4: turn uint8 images into embeddings (model loading, adaptive forward, encoder actor)."""
