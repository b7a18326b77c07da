"""The output dataset on storage: formats, units and plan, manifest, sidecars."""
