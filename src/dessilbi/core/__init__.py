"""The numerical core: the proximal maps, the DessiLBI optimizer, parameter groups, units.

Imports nothing else of dessilbi; every other layer builds on it.
"""
