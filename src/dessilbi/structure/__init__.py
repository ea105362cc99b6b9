"""Model surgery on the structure: pruning into a smaller dense network, export, growing layers."""
