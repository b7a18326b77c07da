"""Input formats: listing raw image-text shards and streaming their samples."""
