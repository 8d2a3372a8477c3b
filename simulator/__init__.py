"""Fleet simulator (placeholder until the simulator issue lands; see README)."""
