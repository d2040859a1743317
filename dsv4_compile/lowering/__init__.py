"""The graph rewrite: backend and options, the ordered pass pipeline, the op registry and its lowerings."""
