"""From prompts to pixels: the text encoder and VAE around the DiT engine."""
