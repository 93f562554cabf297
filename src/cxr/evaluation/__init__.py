"""Scoring a trained model: predictions on a split, test-time augmentation and Grad-CAM saliency."""
