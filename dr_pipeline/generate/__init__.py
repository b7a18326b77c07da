"""The generation stages a unit passes through: CPU preparation, then the model worker."""
