"""Kernel access: tracefs, kernel headers, feature probing, BTF, capabilities and the clock offset."""
