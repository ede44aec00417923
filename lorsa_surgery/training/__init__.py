"""Training Lorsa modules on a host, and healing a spliced model."""
