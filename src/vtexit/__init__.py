"""vtexit: visual-token exit for multimodal LLMs."""
