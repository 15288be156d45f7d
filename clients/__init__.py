"""Client side of every method: one declaration per file (model, parameter partition, local schedule)."""
