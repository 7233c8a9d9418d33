"""Data sets of the training application."""
