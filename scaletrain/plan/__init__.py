"""`scaletrain plan`: analytic memory and step-time models, and the layout search built on them."""
