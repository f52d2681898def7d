"""Command line of the STRUCTURE alignment pipeline: `python -m pipeline <command>`."""
