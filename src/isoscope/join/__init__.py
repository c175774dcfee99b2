"""The per-thread stall timeline and the join of a span's window with it."""
