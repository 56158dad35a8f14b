"""tierfl."""
