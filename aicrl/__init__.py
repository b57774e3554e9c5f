"""AICRL: image captioning."""
