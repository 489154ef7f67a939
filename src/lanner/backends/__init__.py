"""Backends: one narrow interface, heavy imports inside each module."""
