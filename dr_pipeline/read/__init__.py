"""Reading a finished dataset: rows and batches, replay of stored views, the PyTorch dataset."""
