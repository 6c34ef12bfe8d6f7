"""Whole-system updates: signed bundles of a root filesystem for the inactive slot (notes/ab-update.md)."""
