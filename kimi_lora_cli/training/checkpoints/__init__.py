"""A training run's saved weights: `folder` (the checkpoint-N format, discovery, rotation, RNG),
`client` (`CheckpointClient`: save / resume / restore the best / final save, given the model,
optimizer and scheduler) and `final` (the adapter and full-model writers)."""
