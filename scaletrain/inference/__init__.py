"""Using a trained model: load it (load.py) for generation, mask filling and evaluation."""
