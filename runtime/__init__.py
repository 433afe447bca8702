"""dsv4c.runtime."""
