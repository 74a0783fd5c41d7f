"""Standardized sampling: temperature, top-k and top-p all map logits to one adjusted
distribution. The verifier applies the *same* map to the target's and the draft's
logits before the acceptance test; testing against unadjusted distributions samples
from the wrong distribution (vLLM PR #10198).

Random streams are keyed, never carried: every draw comes from a generator seeded by
(request seed, role, round or position), so a stream resumed on another replica draws
exactly what the undisturbed one would have, and never reuses a number that decided
a token already committed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace

import torch

from .errors import InvalidRequest


MAX_LOGPROBS = 20  # top alternatives a request may ask for (OpenAI's limit)


@dataclass(frozen=True)
class Penalties:
    """Logit penalties (core/shaping.py applies them); the defaults change nothing."""

    repetition: float = 1.0  # > 0; 1 = off. Over the prompt and the output (transformers, vLLM)
    presence: float = 0.0  # in [-2, 2], over the output (OpenAI)
    frequency: float = 0.0  # in [-2, 2], over the output (OpenAI)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]), ids ascending

    def __post_init__(self) -> None:
        if not (0 < self.repetition < float("inf")):
            raise InvalidRequest(f"repetition_penalty must be a finite number > 0, got {self.repetition}")
        for name, value in (("presence_penalty", self.presence), ("frequency_penalty", self.frequency)):
            if not -2 <= value <= 2:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value}")
        for token, bias in self.logit_bias:
            if not -100 <= bias <= 100:
                raise InvalidRequest(f"logit_bias of token {token} must be in [-100, 100], got {bias}")

    @property
    def counts_context(self) -> bool:
        """Some rule reads the context's token counts (repetition, presence, frequency)."""
        return self.repetition != 1.0 or bool(self.presence) or bool(self.frequency)

    @property
    def active(self) -> bool:
        return self.counts_context or bool(self.logit_bias)


@dataclass(frozen=True)
class StopRule:
    """When a sequence ends on a token: at any of ``token_ids`` (EOS among them unless the
    request ignores it), once at least ``min_tokens`` tokens were generated. Before that,
    the stop ids are masked out of both models' distributions (core/shaping.py)."""

    token_ids: tuple[int, ...] = ()
    min_tokens: int = 0


@dataclass(frozen=True)
class SamplingParams:
    # 0 means greedy (argmax). A tiny positive temperature is valid and means "almost
    # greedy": logits are shifted by their max before dividing, so it never overflows.
    temperature: float = 0.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1 disables top-p
    seed: int | None = None  # None draws a fresh seed per request
    penalties: Penalties = Penalties()
    stop: StopRule | None = None  # None: the engine's (stop at EOS)
    # The request's original prompt length: its output starts here in the committed
    # tokens, also on a stream resumed with the output so far as its prompt. None: the
    # engine resolves it to the prompt it starts from.
    prompt_len: int | None = None
    # Sampled by Gumbel-max coupling (core/coupling.py): the output depends on the seed
    # alone, equal to target-only decoding's, whatever the drafter or gamma. None: decided
    # where the seed is resolved (``resolve_seed``): coupled when the caller chose it.
    coupled: bool | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0 or self.temperature == float("inf"):  # also rejects NaN
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def resolve_seed(self) -> "SamplingParams":
        """A seed for every request (drafter and verifier must share it). Unless already
        decided, a sampled request whose caller chose the seed is coupled, so that it
        reproduces; one given a fresh seed is not."""
        coupled = self.seed is not None and not self.greedy if self.coupled is None else self.coupled
        seed = random.SystemRandom().randrange(2**63) if self.seed is None else self.seed
        return replace(self, seed=seed, coupled=coupled)


def derive_seed(seed: int, role: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request's n: the first keeps the request's seed,
    each other gets its own stream keyed by (seed, index). The gateway and the CLI both
    use it, so a seed gives the same n samples in-process and served."""
    return seed if index == 0 else derive_seed(seed, f"sample:{index}")


def keyed_generator(seed: int, role: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream for one (seed, role) key, e.g. ``verify:17`` or ``draft@512``."""
    if seed is None:  # every unseeded request would share one stream
        raise ValueError("a keyed random stream needs the request's seed resolved")
    return torch.Generator(device=device).manual_seed(derive_seed(seed, role))


# Below this temperature, logits are shifted by their max before dividing (an
# overflow to inf would give NaN probabilities); above it the shift is softmax's own.
TINY_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingRows:
    """Per-row sampling parameters of a batch, as device tensors, plus the host-side
    facts that choose the code path (so choosing needs no device sync)."""

    temperature: torch.Tensor  # [B] float32; 1 for greedy rows (their probabilities are not used)
    top_k: torch.Tensor  # [B] int64; V where top-k is off
    top_p: torch.Tensor  # [B] float32
    truncates: torch.Tensor  # [B] bool: the row has top-k or top-p
    greedy: torch.Tensor  # [B] bool
    width: int  # how many top tokens the truncating rows need: max top-k, V if a row has top-p only
    greedy_rows: tuple[int, ...]
    tiny_rows: tuple[int, ...]  # sampled rows with a temperature under TINY_TEMPERATURE
    all_unit_temperature: bool

    @property
    def any_sampled(self) -> bool:
        return len(self.greedy_rows) < int(self.temperature.shape[0])

    @classmethod
    def of(cls, params: list[SamplingParams], vocab: int, device: torch.device | str) -> "SamplingRows":
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        truncates = [not p.greedy and (k < vocab or p.top_p < 1) for k, p in zip(top_k, params)]
        width = max([k for k, t in zip(top_k, truncates) if t] or [0])
        temperature = [1.0 if p.greedy else p.temperature for p in params]
        # One host tensor, one copy to the device (float64 holds every top-k exactly).
        packed = torch.tensor([temperature, top_k, [p.top_p for p in params], truncates,
                               [p.greedy for p in params]], dtype=torch.float64).to(device)
        return cls(
            temperature=packed[0].float(),
            top_k=packed[1].long(),
            top_p=packed[2].float(),
            truncates=packed[3].bool(),
            greedy=packed[4].bool(),
            width=width,
            greedy_rows=tuple(b for b, p in enumerate(params) if p.greedy),
            tiny_rows=tuple(b for b, p in enumerate(params) if not p.greedy and p.temperature < TINY_TEMPERATURE),
            all_unit_temperature=all(t == 1.0 for t in temperature),
        )


def common_device(tensors: list[torch.Tensor], fallback: torch.device | str) -> torch.device:
    """The device all of ``tensors`` live on, else ``fallback``: where to assemble a
    batch from per-row tensors without a copy per row."""
    devices = {t.device for t in tensors}
    return devices.pop() if len(devices) == 1 else torch.device(fallback)


def adjusted_probs_rows(logits: torch.Tensor, rows: SamplingRows, consume: bool = False) -> torch.Tensor:
    """logits [B, T, V] -> adjusted probabilities [B, T, V] (float32), row b with its own
    temperature, top-k and top-p; greedy rows are one-hot on the argmax.

    ``consume``: the logits are the caller's to overwrite (float32 ones are): the
    probabilities are written over them. Every step here runs in place on one [B, T, V]
    tensor, the caller's or one copy: on a CPU, a fresh tensor of that size (37 MB at
    batch 8, gamma 8, V = 128k) is mapped from the kernel page by page, and each
    costs more in page faults than the arithmetic (a softmax into a new tensor took
    11-23 ms here, into its input 2.8 ms).

    Top-k and top-p run inside ``torch.topk`` of the widest top-k in the batch, not a
    full-vocabulary sort: at V = 152k and top-k 50 that is a partial selection over the
    row instead of sorting it. Only a row with top-p and no top-k needs the whole
    sorted row (top-p's support can be most of the vocabulary).
    """
    V = logits.shape[-1]
    z = logits.float()
    if z is logits and not consume:
        z = z.clone()
    best = None
    if rows.greedy_rows:
        greedy = torch.tensor(rows.greedy_rows, dtype=torch.long, device=z.device)
        best = z[greedy].argmax(-1)  # [G, T], before anything changes z
    if rows.tiny_rows:
        # Shift first: a temperature of 1e-38 then gives -inf (probability 0), not inf - inf = NaN.
        tiny = list(rows.tiny_rows)
        shifted = z[tiny]
        shifted = (shifted - shifted.amax(-1, keepdim=True)) / rows.temperature[tiny, None, None]
    if not rows.all_unit_temperature:
        z.div_(rows.temperature[:, None, None])
    if rows.tiny_rows:
        z[tiny] = shifted
    if rows.width:
        if rows.width < V:
            values, order = z.topk(rows.width, dim=-1)  # sorted, descending
        else:
            values, order = z.sort(dim=-1, descending=True)
        rank = torch.arange(values.shape[-1], device=z.device)
        keep = (rank < rows.top_k[:, None, None]).expand(values.shape)
        kept = values.masked_fill(~keep, float("-inf")).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # *before* it already reaches top_p. The top-1 token is always kept.
        before = kept.cumsum(-1) - kept
        keep = keep & (~(before >= rows.top_p[:, None, None]) | (rows.top_p[:, None, None] >= 1))
        # Truncating rows: -inf, then their kept top values back. The other rows' top
        # values go back where they were (keep is all true for them): unchanged.
        z.masked_fill_(rows.truncates[:, None, None], float("-inf"))
        z.scatter_(-1, order, values.masked_fill(~keep, float("-inf")))
    torch.softmax(z, -1, out=z)
    if best is not None:
        z.index_fill_(0, greedy, 0.0)
        T = z.shape[1]
        z[greedy[:, None], torch.arange(T, device=z.device)[None, :], best] = 1.0
    return z


def adjusted_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> adjusted probabilities [..., V] (float32), one set of params."""
    shape = logits.shape
    flat = logits.reshape(1, -1, shape[-1])
    return adjusted_probs_rows(flat, SamplingRows.of([params], shape[-1], logits.device)).reshape(shape)


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [..., V] (unnormalised is fine), uniforms [...] ~ U(0, 1) -> token ids [...].

    Inverse CDF: the first token whose cumulative mass passes u * total. No sort and no
    host sync, and one random number per draw. (The exponential trick, argmax(p / E),
    needs V random numbers per draw: measured here at 28 ms for 8 draws at V = 128k on
    CPU, against 2.3 ms for cumsum + searchsorted.) A token of probability 0 is never
    drawn: its cumulative mass equals its predecessor's, so it is never the first past u.
    """
    cdf = probs.cumsum(-1)
    total = cdf[..., -1:].contiguous()
    index = torch.searchsorted(cdf, uniforms[..., None] * total, right=True)[..., 0]
    # u * total can round up to total itself: fall back to the last token with mass,
    # the first whose cumulative mass reaches the total.
    last = torch.searchsorted(cdf, total)[..., 0]
    return torch.minimum(index, last)
