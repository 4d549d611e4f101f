"""Reporting results: classification metrics (numpy, no sklearn.metrics import) and PNG
plots (matplotlib, imported only when a plot is drawn)."""
