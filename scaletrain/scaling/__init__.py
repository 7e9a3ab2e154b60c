"""`scaletrain scaling`: Kaplan and Chinchilla fits to a sweep, plots, and compute-optimal allocation."""
