"""What heads do: attribution to sources and logits, corpus scans and their pages, head families, causal checks."""
