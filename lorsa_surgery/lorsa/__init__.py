"""The Lorsa module (its math, in one file) and the checkpoint formats it reads and writes."""
