"""Model building blocks, one layer a file."""
