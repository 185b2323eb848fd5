"""Plugin modules the reliability tests name in recipes through ``run.plugins``."""
