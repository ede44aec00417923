"""Heads by name, and what is done to them: ablate, steer, patch, record; activation patching."""
