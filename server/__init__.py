"""Coordinator: ServerApp, strategy, update validation, checkpoints and the coordinator CLI."""
