"""dsv4c.lowering."""
