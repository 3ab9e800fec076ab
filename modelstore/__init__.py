"""Versioned model snapshots in a shared store (see :mod:`modelstore.store`)."""
