"""Bundles in a store: key layout, refs and their signatures, push / pull / export / import, and
the process-wide view of the remote's health (one failure policy for every caller).

Knows bundles (``bundler.bundle``) and stores (``bundler.stores``); neither of those knows it.
"""
