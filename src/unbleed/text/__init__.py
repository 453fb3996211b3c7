"""Text: the prompt parser and token groups (which CLIP token indices each entity and attribute has)."""
