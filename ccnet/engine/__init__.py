"""The loop, inference, metrics and checkpoints: plain functions over models and data sets."""
