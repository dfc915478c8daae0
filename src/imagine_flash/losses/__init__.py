"""Losses plugged into the one training loop. Each returns per-sample values; the loop reduces and weights them."""
