"""The multi-hop testbed: tasks, GPT-J training on them, and the positional/symbolic metric."""
