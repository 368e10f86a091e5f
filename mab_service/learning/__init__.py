"""The learning loop: events, the reward check, the posterior store and the event sinks."""
