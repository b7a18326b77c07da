"""The bottom layer: job config, errors, seeds, storage, schema v1 and device settings; imports nothing else of dr-gen."""
