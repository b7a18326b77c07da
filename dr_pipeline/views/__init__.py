"""Images and their views: the decode rule, view parameters, the samplers and renderers, and the fidelity reference."""
