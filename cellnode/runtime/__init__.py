"""Code that runs inside an instance: standard library and cloudpickle only."""
