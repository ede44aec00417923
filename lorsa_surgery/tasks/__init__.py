"""The multi-hop testbed (docs/multihop.md): task generators and solvers, and GPT-J training on them."""

from lorsa_surgery.tasks.multihop import Example, TaskTokenizer, generate, load_examples, save_examples, solve

__all__ = ["Example", "TaskTokenizer", "generate", "load_examples", "save_examples", "solve"]
