"""Measurement code behind ``llmopt bench``."""
