"""Span receivers."""
