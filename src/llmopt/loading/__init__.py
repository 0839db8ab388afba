"""Checkpoint loading: Hugging Face directories (safetensors) and llama.cpp GGUF files."""
