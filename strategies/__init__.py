"""Server side of every method: one Flower strategy per file (what is aggregated, how, to whom)."""
