"""Fleet simulator: a deterministic delivery fleet that drives the tracker (docs/simulator.md)."""
