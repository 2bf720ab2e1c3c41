"""Converters from the official PyTorch checkpoints to our parameter trees."""
