"""Data loading, tokenized-example batching and host-to-device transfer."""
