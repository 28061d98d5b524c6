"""Dataset readers (filled in below by the reader registry)."""
