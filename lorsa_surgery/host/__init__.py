"""The host side: architectures, loading, placement, the corpus, LM metrics, and splicing Lorsa into a host."""
