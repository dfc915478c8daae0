"""imagine-flash."""
