"""Server strategies beyond Flower's built-ins: one file per strategy."""
