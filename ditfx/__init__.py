"""ditfx: compiler passes that make Diffusion Transformer inference fast."""
