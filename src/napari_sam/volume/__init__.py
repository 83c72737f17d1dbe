"""Volumes: slice embeddings, propagation between slices, and the session that ties them."""
