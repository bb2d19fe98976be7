"""Fast-dVLM serving: PyTorch reference model, decoders and an SGLang plugin."""
