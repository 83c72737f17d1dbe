"""SAM 1 network modules: image encoders (ViT, TinyViT), prompt encoder, mask decoder."""
