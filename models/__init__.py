"""Twin submodels in plain PyTorch, the consortium feature spec and the wire names."""
