from llmopt.kv_cache.static import StaticKVCache

__all__ = ["StaticKVCache"]
