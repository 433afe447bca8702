"""dsv4c.passes."""
