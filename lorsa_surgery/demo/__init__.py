"""The `lorsa-surgery demo` report: the whole story on the embedded default model."""
