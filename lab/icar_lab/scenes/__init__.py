"""Captioned synthetic scenes: the embedded corpus for the demo, training and evaluation."""
