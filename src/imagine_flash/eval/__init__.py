"""Evaluation: FID/KID on Inception-v3 features, the in-domain classifier, prompt alignment, benchmark metrics."""
