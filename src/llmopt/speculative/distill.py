"""Distilling a small draft model from a teacher's logits.

The student shares the teacher's tokenizer (same vocabulary, same embedding table when the hidden
size matches) and learns to match the teacher's next-token distribution (KL divergence, optionally
mixed with the plain next-token loss), which is exactly what a draft needs: acceptance is high when
the two distributions agree. Where shapes allow the student starts from the teacher's weights
(embeddings, final norm, head and a spread of its layers), so a short run gets far.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.config import ModelConfig
from llmopt.engine.generate import Generator
from llmopt.errors import UserError
from llmopt.loading.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    num_layers: int
    hidden_size: int | None = None  # None: the teacher's
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    steps: int = 300
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    init: str = "teacher"  # "teacher": copy what fits; "random"
    init_layers: str = "spread"  # which teacher layers seed the student: "spread" or "first"
    freeze_embeddings: bool = True  # when copied from the teacher (saves the head's gradient)
    checkpoint_every: int = 100
    eval_batches: int = 4
    seed: int = 0
    # On-policy data: this fraction of each batch's rows comes from the teacher's own greedy
    # continuations of corpus prompts (what a draft is asked to predict at decode time) instead
    # of human text, whose next tokens the teacher often does not choose.
    on_policy: float = 0.0
    policy_prompts: int = 256  # continuations generated before training
    policy_prompt_len: int = 64
    policy_new_tokens: int = 96
    # Join hard-wrapped lines inside paragraphs (Project Gutenberg text breaks every ~70
    # characters): a draft trained on wrapped text learns to expect a line break every dozen
    # tokens and predicts one on unwrapped prompts, where the target never does.
    unwrap_lines: bool = True
    # Finish within this many seconds, counted from the start (teacher generation included): once
    # the first training steps are timed, the run is cut to the steps that fit and the
    # learning-rate schedule is stretched over exactly those.
    time_limit_s: float | None = None
    # Continue from a student written by an earlier run (same shape): its weights replace the
    # initialisation; the optimizer and schedule start afresh.
    resume: str | None = None
    # A file of teacher continuations: read when it exists (made with the same settings), else
    # generated and written there, so a later run (or a resumed one) skips the generation.
    policy_cache: str | None = None
    compile_teacher: bool = True  # on a GPU, generate the continuations with a compiled step

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise UserError(f"--layers must be >= 1, got {self.num_layers}")
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise UserError("--kl-weight and --ce-weight must be >= 0 and not both 0")
        if self.temperature <= 0:
            raise UserError(f"--distill-temperature must be > 0, got {self.temperature}")
        if self.init not in ("teacher", "random"):
            raise UserError(f"--init must be teacher or random, got {self.init!r}")
        if self.init_layers not in ("spread", "first"):
            raise UserError(f"--init-layers must be spread or first, got {self.init_layers!r}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise UserError(f"--on-policy must be a fraction in [0, 1], got {self.on_policy}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise UserError(f"--time-limit must be > 0 seconds, got {self.time_limit_s}")
        if self.on_policy > 0:
            if self.policy_prompts < 1 or self.policy_prompt_len < 1 or self.policy_new_tokens < 1:
                raise UserError("--policy-prompts, --policy-prompt-len and --policy-new-tokens must be >= 1")
            if self.policy_prompt_len + self.policy_new_tokens < self.seq_len + 1:
                raise UserError(
                    f"--policy-prompt-len + --policy-new-tokens must be at least --seq-len + 1 "
                    f"({self.seq_len + 1}), got {self.policy_prompt_len + self.policy_new_tokens}")


def student_config(teacher: ModelConfig, cfg: DistillConfig) -> ModelConfig:
    hidden = cfg.hidden_size or teacher.hidden_size
    heads = cfg.num_heads or (teacher.num_heads if hidden == teacher.hidden_size
                              else max(1, hidden // teacher.head_dim))
    kv_heads = cfg.num_kv_heads or (teacher.num_kv_heads if heads == teacher.num_heads
                                    else math.gcd(heads, teacher.num_kv_heads))
    if hidden % heads:
        raise UserError(f"--hidden-size {hidden} is not a multiple of --heads {heads}")
    if heads % kv_heads:
        raise UserError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}")
    inter = cfg.intermediate_size or round(teacher.intermediate_size * hidden / teacher.hidden_size)
    try:
        return teacher.replace(num_layers=cfg.num_layers, hidden_size=hidden, num_heads=heads,
                               num_kv_heads=kv_heads, head_dim=hidden // heads,
                               intermediate_size=inter)
    except ValueError as e:
        raise UserError(f"student shape: {e}") from None


def teacher_layer_indices(num_teacher: int, num_student: int, how: str) -> list[int]:
    if how == "first" or num_student >= num_teacher:
        return list(range(min(num_student, num_teacher)))
    if num_student == 1:
        return [0]
    # Evenly spread, first and last included.
    return [round(i * (num_teacher - 1) / (num_student - 1)) for i in range(num_student)]


def init_student(
    student: nn.Module, teacher: nn.Module, cfg: DistillConfig
) -> tuple[list[str], set[str]]:
    """Copy the teacher's tensors into the student where shapes allow.

    Returns (names of what was copied, names of parameters to freeze).
    """
    copied: list[str] = []
    frozen: set[str] = set()
    t_sd = teacher.state_dict()
    s_params = dict(student.named_parameters())
    with torch.no_grad():
        emb_s = student.model.embed_tokens.weight
        emb_t = t_sd["model.embed_tokens.weight"].float()
        if emb_s.shape == emb_t.shape:
            emb_s.copy_(emb_t)
            copied.append("model.embed_tokens.weight")
            if cfg.freeze_embeddings:
                frozen.add("model.embed_tokens.weight")
        else:
            # Narrower student: keep the teacher's embedding geometry along its principal axes.
            h = emb_s.shape[1]
            _, vecs = torch.linalg.eigh(emb_t.T @ emb_t)  # ascending eigenvalues
            emb_s.copy_(emb_t @ vecs[:, -h:].flip(-1))
            copied.append("model.embed_tokens.weight (principal axes)")
        pairs = [("model.norm.weight", "model.norm.weight")]
        if not student.config.tie_word_embeddings:
            pairs.append(("lm_head.weight", "lm_head.weight"))
        idx = teacher_layer_indices(teacher.config.num_layers, student.config.num_layers,
                                    cfg.init_layers)
        for s_i, t_i in enumerate(idx):
            prefix_s, prefix_t = f"model.layers.{s_i}.", f"model.layers.{t_i}."
            for name in s_params:
                if name.startswith(prefix_s):
                    pairs.append((name, prefix_t + name[len(prefix_s):]))
        for s_name, t_name in pairs:
            if s_name in s_params and t_name in t_sd and s_params[s_name].shape == t_sd[t_name].shape:
                s_params[s_name].copy_(t_sd[t_name].float())
                copied.append(s_name)
                if s_name == "lm_head.weight" and cfg.freeze_embeddings:
                    frozen.add(s_name)
    return copied, frozen


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    cfg: DistillConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(teacher || student) at temperature T (scaled by T^2), plus ce_weight * next-token loss."""
    vocab = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, vocab)  # [N, V]
    t = teacher_logits.float().reshape(-1, vocab)
    temp = cfg.temperature
    kl = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                  reduction="batchmean") * temp * temp
    loss = cfg.kl_weight * kl
    parts = {"kl": kl.detach()}  # tensors: reading them is a host-device sync, left to the caller
    if cfg.ce_weight > 0:
        ce = F.cross_entropy(s, targets.reshape(-1))
        loss = loss + cfg.ce_weight * ce
        parts["ce"] = ce.detach()
    return loss, parts


def unwrap_lines(text: str) -> str:
    """Paragraphs (separated by blank lines) with their inner line breaks and runs of spaces
    turned into single spaces; paragraphs stay separated by one blank line."""
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paras if p)


class TokenWindows:
    """Random fixed-length windows from one long token stream; a held-out tail for evaluation."""

    def __init__(self, ids: list[int], seq_len: int, seed: int, holdout: float = 0.05) -> None:
        need = 2 * (seq_len + 1)
        if len(ids) < need * 2:
            raise UserError(f"the corpus has {len(ids)} tokens; need at least {need * 2} for "
                            f"--seq-len {seq_len}")
        data = torch.tensor(ids, dtype=torch.long)
        cut = max(len(ids) - max(int(len(ids) * holdout), need), need)
        self.train, self.held = data[:cut], data[cut:]
        self.seq_len = seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def _windows(self, data: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        offs = torch.arange(self.seq_len + 1)
        return data[starts[:, None] + offs]  # [B, T+1]

    def batch(self, batch_size: int) -> torch.Tensor:
        starts = torch.randint(0, len(self.train) - self.seq_len - 1, (batch_size,), generator=self.gen)
        return self._windows(self.train, starts)

    def eval_batches(self, batch_size: int, count: int) -> list[torch.Tensor]:
        n = (len(self.held) - 1) // (self.seq_len + 1)
        starts = torch.arange(n) * (self.seq_len + 1)
        return [self._windows(self.held, starts[i : i + batch_size])
                for i in range(0, min(n, batch_size * count), batch_size)]


def policy_batch(device: torch.device) -> int:
    """Prompts continued at once: wide on a GPU, where a 135M teacher's decode step is cheap."""
    return 1024 if device.type == "cuda" else 32


class PolicySequences:
    """The teacher's greedy continuations of prompts cut from a token stream: [N, P + G] token
    ids, drawn from as random windows of seq_len + 1 (so the prompt's end is sometimes in view)."""

    def __init__(self, seqs: torch.Tensor, seq_len: int, seed: int) -> None:
        self.seqs, self.seq_len = seqs, seq_len
        self.gen = torch.Generator().manual_seed(seed + 1)

    @classmethod
    def generate(cls, teacher: nn.Module, stream: torch.Tensor, cfg: DistillConfig, count: int,
                 device: torch.device, seed: int, progress: bool = False,
                 generator: Generator | None = None) -> PolicySequences:
        """``generator``: a (compiled) Generator over ``teacher`` to reuse across calls; a compiled
        one gets every batch at full width (the last padded), so one captured graph serves all."""
        from tqdm import tqdm

        from llmopt.sampling import SamplingParams

        plen, glen = cfg.policy_prompt_len, cfg.policy_new_tokens
        if len(stream) < plen + 1:
            raise UserError(f"the corpus is too short for --policy-prompt-len {plen}")
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(stream) - plen, (count,), generator=g)
        prompts = stream[starts[:, None] + torch.arange(plen)]  # [N, P]
        gen = generator if generator is not None else Generator(teacher, None, device)
        params = SamplingParams(max_new_tokens=glen, temperature=0, ignore_eos=True)
        rows: list[list[int]] = []
        batch = policy_batch(device)  # all prompts share one length: no padding within a batch
        for i in tqdm(range(0, count, batch), desc="teacher continuations", disable=not progress,
                      unit="batch"):
            chunk = prompts[i : i + batch].tolist()
            width = batch if gen.compiled else len(chunk)
            outs = gen.generate(chunk + [chunk[0]] * (width - len(chunk)), params)[: len(chunk)]
            rows.extend(p + o.token_ids for p, o in zip(chunk, outs, strict=True))
        if generator is None:
            teacher.clear_caches()
        return cls(torch.tensor(rows, dtype=torch.long), cfg.seq_len, seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        n, length = self.seqs.shape
        rows = torch.randint(0, n, (batch_size,), generator=self.gen)
        offs = torch.randint(0, length - self.seq_len, (batch_size,), generator=self.gen)
        return self.seqs[rows[:, None], offs[:, None] + torch.arange(self.seq_len + 1)]  # [B, T+1]

    def eval_batches(self, batch_size: int) -> list[torch.Tensor]:
        """Every sequence's last seq_len + 1 tokens (mostly the teacher's own continuation)."""
        tail = self.seqs[:, -(self.seq_len + 1):]
        return [tail[i : i + batch_size] for i in range(0, len(tail), batch_size)]


def lr_lambda(cfg: DistillConfig, total: list[int] | None = None) -> object:
    """Linear warm-up, then cosine decay over the run's steps: ``total[0]`` when given (a list,
    so a time-limited run can shorten the schedule once it knows its step time), else cfg.steps."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        steps = total[0] if total else cfg.steps
        span = max(1, steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor],
             cfg: DistillConfig, device: torch.device) -> dict[str, float]:
    """Held-out KL and top-1 agreement (the greedy acceptance rate of a one-token draft)."""
    kl_sum, agree, count = 0.0, 0, 0
    for b in batches:
        x = b[:, :-1].to(device)
        s_logits = student(x)
        t_logits = teacher(x)
        _, parts = distill_loss(s_logits, t_logits, b[:, 1:].to(device), cfg)
        kl_sum += float(parts["kl"]) * x.numel()
        agree += int((s_logits.argmax(-1) == t_logits.argmax(-1)).sum())
        count += x.numel()
    return {"kl": kl_sum / max(1, count), "top1_agreement": agree / max(1, count)}


def load_student_weights(student: nn.Module, path: Path) -> None:
    """Copy a student written by an earlier run (``path``: its output or checkpoint directory)
    into ``student``, which must have its shape."""
    from llmopt.loading.loader import load_model

    if not (path / "config.json").is_file():
        raise UserError(f"--resume {path}: not a model directory (no config.json)")
    prev = load_model(str(path), device="cpu", dtype=torch.float32, progress=False).model
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim")
    diff = [f"{f} {getattr(prev.config, f)} (here {getattr(student.config, f)})"
            for f in fields if getattr(prev.config, f) != getattr(student.config, f)]
    if diff:
        raise UserError(f"--resume {path} has another shape: " + ", ".join(diff))
    own = dict(student.named_parameters())
    with torch.no_grad():
        for name, p in prev.named_parameters():
            own[name].copy_(p)


def read_policy_cache(path: Path, key: dict[str, object]) -> dict[str, torch.Tensor] | None:
    """The cached continuations, or None when ``path`` does not exist yet."""
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"--policy-cache {path} could not be read: {e}") from None
    if not isinstance(data, dict) or data.get("key") != key:
        raise UserError(f"--policy-cache {path} was made with other settings (teacher, corpus or "
                        "--policy-* options); give another file name")
    return data


def save_student(student: nn.Module, tokenizer: Tokenizer | None, out: Path,
                 generation_config: dict[str, object] | None = None) -> None:
    from llmopt.loading.loader import save_checkpoint

    save_checkpoint(student, tokenizer, out)
    if generation_config:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))


def distill(
    teacher: nn.Module,
    tokenizer: Tokenizer,
    corpus_text: str,
    cfg: DistillConfig,
    out_dir: Path,
    device: torch.device,
    progress: bool = True,
    meta: dict[str, object] | None = None,
) -> dict[str, object]:
    """Train a student, write it (and checkpoints) under ``out_dir``; returns the run summary."""
    from llmopt.models import build_model

    t_begin = time.perf_counter()
    torch.manual_seed(cfg.seed)
    teacher.clear_caches()
    s_config = student_config(teacher.config, cfg)
    student = build_model(s_config).to(device=device, dtype=torch.float32)
    # Same init scale as the random presets, so untouched layers start well-conditioned.
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = 0.02 if "embed" in name or "lm_head" in name else 1.0 / math.sqrt(p.shape[-1])
                p.normal_(0.0, std)
    student.tie_weights()
    copied: list[str] = []
    frozen: set[str] = set()
    if cfg.init == "teacher":
        copied, frozen = init_student(student, teacher, cfg)
    if cfg.resume:
        load_student_weights(student, Path(cfg.resume))
    student.train()
    params = []
    for name, p in student.named_parameters():
        p.requires_grad_(name not in frozen)
        if p.requires_grad:
            params.append(p)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            fused=device.type == "cuda")
    total = [cfg.steps]  # shortened by time_limit_s once the step time is known
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))  # type: ignore[arg-type]
    # On CUDA the student's matmuls run in bfloat16 (float32 master weights and optimizer state).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    if cfg.unwrap_lines:
        corpus_text = unwrap_lines(corpus_text)
    ids = tokenizer.encode(corpus_text, add_special_tokens=False)
    data = TokenWindows(ids, cfg.seq_len, cfg.seed)
    held = data.eval_batches(cfg.batch_size, cfg.eval_batches)
    policy = held_policy = None
    t_gen = time.perf_counter()
    from_cache = False
    if cfg.on_policy > 0:
        key = {"teacher": teacher.config.to_hf_dict(), "corpus_tokens": len(ids),
               "policy_prompts": cfg.policy_prompts, "policy_prompt_len": cfg.policy_prompt_len,
               "policy_new_tokens": cfg.policy_new_tokens, "seed": cfg.seed,
               "eval_prompts": cfg.batch_size * cfg.eval_batches}
        cached = read_policy_cache(Path(cfg.policy_cache), key) if cfg.policy_cache else None
        if cached is not None:
            policy = PolicySequences(cached["train"], cfg.seq_len, cfg.seed)
            held_seqs = cached["held"]
            from_cache = True
        else:
            # On a GPU the teacher's decode step is compiled and captured (regional): the eager
            # step at 1,024 rows took about ten times what its arithmetic and memory traffic need.
            gen = Generator(teacher, None, device, compile=cfg.compile_teacher and device.type == "cuda")
            # Training prompts from the training part, evaluation prompts from the held-out tail.
            policy = PolicySequences.generate(teacher, data.train, cfg, cfg.policy_prompts, device,
                                              cfg.seed, progress, generator=gen)
            held_seqs = PolicySequences.generate(teacher, data.held, cfg,
                                                 cfg.batch_size * cfg.eval_batches, device,
                                                 cfg.seed + 7, generator=gen).seqs
            del gen
            teacher.clear_caches()
            if cfg.policy_cache:
                Path(cfg.policy_cache).parent.mkdir(parents=True, exist_ok=True)
                torch.save({"key": key, "train": policy.seqs, "held": held_seqs}, cfg.policy_cache)
        held_policy = PolicySequences(held_seqs, cfg.seq_len, cfg.seed).eval_batches(cfg.batch_size)
    gen_s = time.perf_counter() - t_gen
    log.info("teacher continuations: %.1f s", gen_s)
    n_policy = round(cfg.batch_size * cfg.on_policy)
    out_dir.mkdir(parents=True, exist_ok=True)
    student.eval()
    t_eval = time.perf_counter()
    before = evaluate(student, teacher, held, cfg, device)
    before_policy = evaluate(student, teacher, held_policy, cfg, device) if held_policy else None
    student.train()
    log.info("student %s; copied %d tensors from the teacher; held-out before: %s",
             s_config, len(copied), before)
    gen_cfg = {"eos_token_id": sorted(tokenizer.eos_token_ids)} if tokenizer.eos_token_ids else None

    from tqdm import tqdm

    history: list[dict[str, float]] = []
    # Each step's loss, KL and gradient norm stay on the device until read_pending() turns every
    # tenth step's batch of them into floats: one host-device sync per ten steps, not three per
    # step, so the host queues the next steps' kernels while the device runs.
    pending: list[dict[str, object]] = []

    def read_pending() -> None:
        if not pending:
            return
        keys = [k for k, v in pending[0].items() if isinstance(v, torch.Tensor)]
        vals = torch.stack([torch.stack([r[k].float() for k in keys]) for r in pending]).tolist()
        for r, row in zip(pending, vals, strict=True):
            history.append({**r, **dict(zip(keys, row, strict=True))})  # type: ignore[dict-item]
        pending.clear()
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", lr=f"{history[-1]['lr']:.2e}")

    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    last_ckpt: Path | None = None
    bar = tqdm(total=cfg.steps, desc="distill", disable=not progress, unit="step")
    # A time limit is planned from the steps 3..23 (the first ones carry one-off start-up costs).
    timed_from, timed_after = 3, 23
    t_from = t0
    step = 0
    while step < total[0]:
        parts_b = []
        if n_policy < cfg.batch_size:
            parts_b.append(data.batch(cfg.batch_size - n_policy))
        if policy is not None and n_policy > 0:
            parts_b.append(policy.batch(n_policy))
        batch = torch.cat(parts_b)  # [B, T+1]
        # from pinned memory, the copy does not wait for the device to finish the last step
        batch = batch.pin_memory().to(device, non_blocking=True) if cuda else batch.to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            t_logits = teacher(x)  # [B, T, V]
        with autocast:
            s_logits = student(x)
        loss, parts = distill_loss(s_logits, t_logits, y, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        pending.append({"step": step + 1, "loss": loss.detach(), **parts, "grad_norm": gnorm.detach(),
                        "lr": sched.get_last_lr()[0]})
        if (step + 1) % 10 == 0:
            read_pending()
        bar.update(1)
        if step + 1 == timed_from:
            if cuda:
                torch.cuda.synchronize(device)
            t_from = time.perf_counter()
        if cfg.time_limit_s is not None and step + 1 == timed_after:
            if cuda:
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            per_step = (now - t_from) / (timed_after - timed_from)
            # What is left, less the final evaluation (about as long as the one before training).
            left = cfg.time_limit_s - (now - t_begin) - (t0 - t_eval)
            fit = step + 1 + int(left / per_step)
            if fit < total[0]:
                total[0] = max(step + 1, fit)
                bar.total = total[0]
                log.info("time limit %.0f s: %.3f s per step, training for %d steps instead of %d",
                         cfg.time_limit_s, per_step, total[0], cfg.steps)
        elif (cfg.time_limit_s is not None and step + 1 > timed_after
              and time.perf_counter() - t_begin > cfg.time_limit_s):
            total[0] = step + 1  # slower than planned: stop now rather than overrun
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total[0]:
            ckpt = out_dir / f"checkpoint-{step + 1}"
            student.eval()
            save_student(student, tokenizer, ckpt, gen_cfg)
            student.train()
            if last_ckpt is not None:  # keep only the newest: each is a full model
                for f in last_ckpt.iterdir():
                    f.unlink()
                last_ckpt.rmdir()
            last_ckpt = ckpt
        step += 1
    read_pending()
    bar.close()
    train_s = time.perf_counter() - t0
    log.info("trained %d steps in %.1f s", step, train_s)
    student.eval().requires_grad_(False)
    after = evaluate(student, teacher, held, cfg, device)
    after_policy = evaluate(student, teacher, held_policy, cfg, device) if held_policy else None
    save_student(student, tokenizer, out_dir, gen_cfg)
    summary: dict[str, object] = {
        **(meta or {}),
        "config": asdict(cfg),
        "student": s_config.to_hf_dict(),
        "student_params": sum(p.numel() for p in student.parameters()),
        "copied_from_teacher": copied,
        "frozen": sorted(frozen),
        "corpus_tokens": len(ids),
        "held_out_before": before,
        "held_out_after": after,
        # on the teacher's own greedy continuations of held-out prompts (on-policy runs only)
        "held_out_policy_before": before_policy,
        "held_out_policy_after": after_policy,
        "teacher_generation_seconds": round(gen_s, 1),
        "policy_from_cache": from_cache,
        "steps_run": step,
        "train_seconds": round(train_s, 1),
        "loss_first": history[0] if history else None,
        "loss_last": history[-1] if history else None,
        "loss_every_10": [h for h in history if h["step"] % 10 == 0],
    }
    (out_dir / "distill.json").write_text(json.dumps(summary, indent=2))
    return summary
