"""Model layer: load checkpoints, split into spans, run spans with KV caches, client head."""
