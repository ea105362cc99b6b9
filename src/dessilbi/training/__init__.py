"""Training runs: configuration, the run folder, the loop and its checkpoints."""
