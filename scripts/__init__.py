"""Command-line tools that read results/: plot, compare, bench."""
