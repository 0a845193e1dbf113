"""The parts of `cellnode.client`: `BaseClient`, and one group of `Client` methods per module."""
