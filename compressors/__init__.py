"""Compressors that rewrite a captured network (channel pruning, low-rank decomposition).

Structured channel pruning currently lives in :mod:`graph.pruning`; LASSO/LARS and SVD compressors come next.
"""
