"""Data sets, augmentation and batching. Nothing here knows Hydra or Jittor."""
