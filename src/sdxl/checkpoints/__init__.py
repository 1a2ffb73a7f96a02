"""Checkpoint I/O: safe file reading, format detection, one key map per format, loaders and writers."""
