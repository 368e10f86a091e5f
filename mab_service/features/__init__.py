"""Feature sources: where each arm's Beta posterior parameters come from."""
