"""The trainer: ``loop.py`` holds the training loop, ``__main__.py`` a rank's entry point under torchrun."""
