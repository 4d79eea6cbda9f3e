"""Training: backbones, models, features, the loop, export, the bundle writer and reports (torch)."""
