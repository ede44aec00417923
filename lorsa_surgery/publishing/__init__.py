"""Patched-model folders, their model cards, and what goes to the Hub."""
