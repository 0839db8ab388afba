from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    decode_seconds: float
    total_seconds: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, over the time after the first token."""
        if self.new_tokens <= 1 or self.decode_seconds <= 0:
            return 0.0
        return (self.new_tokens - 1) / self.decode_seconds

    def as_dict(self) -> dict[str, float | int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "time_to_first_token_s": round(self.time_to_first_token_s, 6),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "total_seconds": round(self.total_seconds, 6),
        }


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: GenerationStats | None = None
    extra: dict[str, object] = field(default_factory=dict)
