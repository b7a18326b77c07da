"""Examples of plugging your own code into dr-gen (run from the repository root, or put it on PYTHONPATH)."""
