"""One module per family table (data only)."""
