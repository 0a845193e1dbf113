"""Capture a notebook's interpreter state into a checkpoint: notebooks, kernel capture, blob store, cell analysis."""
