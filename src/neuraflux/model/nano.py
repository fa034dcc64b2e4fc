"""The transformer backbone, top to bottom: embeddings, attention, layer, model, LM head.

Shapes: B batch, T query length, S key length (cache included), C n_embd, H heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from neuraflux.model.config import NanoConfig
from neuraflux.model.dropout import NanoDropout, attention_with_dropout

if TYPE_CHECKING:
    from neuraflux.tokenizer import NanoTokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class KVCache:
    """Preallocated keys/values for every layer; `length` positions are filled.

    With `positions` (B,) set, each row is an independent slot: row b's next keys go to `positions[b]`, its
    queries see only its own first `positions[b] + t + 1` keys, and `length` is unused. The server decodes
    requests of different lengths together this way (continuous batching).
    """

    keys: list[torch.Tensor]  # each (B, H, S_max, D)
    values: list[torch.Tensor]
    length: int = 0
    positions: torch.Tensor | None = None  # (B,) long: filled positions per row, or None for one shared length

    @classmethod
    def empty(cls, config: NanoConfig, batch_size: int, max_length: int, device, dtype) -> KVCache:
        shape = (batch_size, config.n_head, max_length, config.head_dim)
        return cls(
            keys=[torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
            values=[torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
        )

    @classmethod
    def slots(cls, config: NanoConfig, n_slots: int, max_length: int, device, dtype) -> KVCache:
        """A per-row cache, all rows empty. Zero-filled, unlike `empty`: a masked key still enters the fused
        kernel's arithmetic, and uninitialised memory holding NaN would poison every row it sits in."""
        shape = (n_slots, config.n_head, max_length, config.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
            positions=torch.zeros(n_slots, dtype=torch.long, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def rows(self, stop: int) -> KVCache:
        """A view of slots [0, stop): writes through it land in this cache (positions included)."""
        return KVCache(
            keys=[k[:stop] for k in self.keys],
            values=[v[:stop] for v in self.values],
            positions=None if self.positions is None else self.positions[:stop],
        )


class NanoEmbeddings(nn.Module):
    """Token embeddings plus learned absolute positions (none with `position_encoding="rope"`: attention rotates
    queries and keys instead)."""

    def __init__(self, config: NanoConfig):
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.n_embd)
        learned = config.position_encoding == "learned"
        self.position = nn.Embedding(config.max_position_embeddings, config.n_embd) if learned else None
        self.dropout = NanoDropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # input_ids (B, T), position_ids (B, T) or (1, T) -> (B, T, C)
        x = self.token(input_ids)
        return self.dropout(x if self.position is None else x + self.position(position_ids))


def rope_angles(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's rotation angles: (B, T) -> two (B, 1, T, D / 2) float32 tensors (B may be 1).

    Pair i of a head's dimensions turns by position * theta^(-2i / D), so the score between a query at m and a
    key at n depends on m - n only (Su et al. 2021)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, D / 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys; dimensions i and i + D/2 form a pair (the GPT-NeoX layout)."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class NanoSelfAttention(nn.Module):
    """Causal multi-head self-attention on scaled_dot_product_attention, with an optional KV cache."""

    def __init__(self, config: NanoConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = NanoDropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
        need_weights: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C); mask None (plain causal) or bool (B, 1, T, S), True = may attend; rope the (cos, sin) of
        `rope_angles` for these T positions, or None (learned positions).

        cache is (keys, values, start): start an int (every row writes at start) or a (B,) tensor of per-row
        write positions, in which case the mask is required and its S says how many cached keys to read.
        """
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            # before caching: a cached key keeps the rotation of its own position
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            cache_k, cache_v, start = cache
            if isinstance(start, torch.Tensor):
                idx = start[:, None] + torch.arange(T, device=x.device)  # (B, T): each row's own positions
                rows = torch.arange(B, device=x.device)[:, None]  # (B, 1)
                # an indexed write, not scatter_: under torch.compile it stays in place, where scatter_ copied the
                # whole cache three times a step; indexing dims 0 and 2 puts them first: values (B, T, H, D)
                cache_k[rows, :, idx] = k.transpose(1, 2)
                cache_v[rows, :, idx] = v.transpose(1, 2)
                S = mask.shape[-1]
                k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # (B, H, S, D); keys past a row's end are masked
            else:
                cache_k[:, :, start : start + T] = k
                cache_v[:, :, start : start + T] = v
                k, v = cache_k[:, :, : start + T], cache_v[:, :, : start + T]  # (B, H, S, D)
        weights = None
        if need_weights:
            # Explicit softmax so the maps can be shown; same math as the fused kernel.
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, S)
            if mask is None:
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = weights @ v
        else:
            dropout_p = self.dropout if self.training else 0.0
            # No mask means one of build_attention_mask's two cases: T new keys only (the kernel's causal
            # path, cache or not), or a single query that may attend to every key.
            is_causal = mask is None and T > 1
            if is_causal and k.shape[2] != T:
                raise ValueError(f"{T} queries over {k.shape[2]} keys need an explicit causal mask")
            if dropout_p > 0 and cache is None and x.device.type == "cpu":
                y = attention_with_dropout(q, k, v, mask, dropout_p)  # the kernel's CPU dropout path is unfused fp32
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y)), weights


class NanoMLP(nn.Module):
    def __init__(self, config: NanoConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU()  # exact erf form: as nanoGPT, and faster than the tanh form on CPU
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = NanoDropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class NanoLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: NanoConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = NanoSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = NanoMLP(config)

    def forward(self, x, mask=None, cache=None, need_weights=False, rope=None):
        a, weights = self.attn(self.ln_1(x), mask, cache, need_weights, rope)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, weights


def build_attention_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int = 0, device=None
) -> torch.Tensor | None:
    """Bool (B, 1, T, S) mask, S = past_length + T, from a (B, S) padding mask (None: nothing is padded).

    A query may attend to keys at or before its own position that are not padding. Padding queries may
    attend to themselves, so no softmax row is empty (an all -inf row would give NaN).

    Returns None exactly when no explicit mask is needed: plain causal attention over the T new keys alone
    (past_length 0, nothing padded: the kernel's `is_causal`), or one query that may see every key. Several
    queries after cached keys (a chunked prefill) always get a mask: the kernel's `is_causal` aligns its
    triangle to the top-left corner, which would hide cached keys and show later ones.
    """
    S = past_length + query_length
    key_ok = None if attention_mask is None else attention_mask[:, :S].bool()  # (B, S)
    if key_ok is not None:
        device = key_ok.device
        if bool(key_ok.all()):
            key_ok = None
    if key_ok is None and (query_length == 1 or past_length == 0):
        return None
    q_pos = torch.arange(past_length, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    if key_ok is None:
        return causal[None, None]  # (1, 1, T, S): the same for every row
    return (causal[None] & key_ok[:, None, :] | (k_pos == q_pos)[None])[:, None]  # (B, 1, T, S)


def slot_attention_mask(positions: torch.Tensor, query_length: int, key_length: int) -> torch.Tensor:
    """Bool (B, 1, T, S) mask for per-row cache positions (B,): query t of row b sees keys 0..positions[b]+t.

    Keys beyond a row's own end (left by a longer request that held the slot before) stay hidden.
    """
    q_pos = positions[:, None] + torch.arange(query_length, device=positions.device)  # (B, T)
    k_pos = torch.arange(key_length, device=positions.device)  # (S,)
    return (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # (B, 1, T, S)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Each row is real tokens then padding (or no padding at all)."""
    m = attention_mask.bool()
    return bool((m[:, 1:] <= m[:, :-1]).all())


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row starts at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class NanoModel(nn.Module):
    """Embeddings, the stack of layers and the final LayerNorm: input ids to hidden states."""

    def __init__(self, config: NanoConfig):
        super().__init__()
        self.config = config
        self.embeddings = NanoEmbeddings(config)
        self.layers = nn.ModuleList([NanoLayer(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        need_weights: bool = False,
    ):
        """input_ids (B, T) -> hidden (B, T, C); with need_weights, also a list of (B, H, T, S) per layer.

        attention_mask (B, S) covers the cached positions too when kv_cache is given. A cache with per-row
        `positions` needs no attention_mask (each row's length is its mask) and advances every row by T.
        """
        B, T = input_ids.shape
        if kv_cache is not None and kv_cache.positions is not None:
            return self._forward_slots(input_ids, kv_cache, need_weights)
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds model.max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        if attention_mask is not None and past == 0 and is_right_padded(attention_mask):
            # A real token never attends to padding on its right, so right padding needs no mask: the fused
            # causal kernel gives the same outputs at real positions (padding rows are never read).
            attention_mask = None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask[:, : past + T])[:, past:]
            else:
                # (1, T), broadcast over the batch: the position table's backward scatters T rows, not B * T
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
        mask = build_attention_mask(attention_mask, T, past, input_ids.device)
        x = self.embeddings(input_ids, position_ids)  # (B, T, C)
        rope = self._rope(position_ids)
        maps = []
        for i, layer in enumerate(self.layers):
            cache = (kv_cache.keys[i], kv_cache.values[i], past) if kv_cache is not None else None
            x, weights = layer(x, mask, cache, need_weights, rope)
            if need_weights:
                maps.append(weights)
        if kv_cache is not None:
            kv_cache.length = past + T
        x = self.ln_f(x)
        return (x, maps) if need_weights else x

    def _rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.position_encoding != "rope":
            return None
        return rope_angles(position_ids, self.config.head_dim, self.config.rope_theta)  # once for all layers

    def _forward_slots(self, input_ids: torch.Tensor, kv_cache: KVCache, need_weights: bool):
        """input_ids (B, T) appended to each row's own cached prefix at kv_cache.positions (B,)."""
        B, T = input_ids.shape
        start = kv_cache.positions
        key_length = int(start.max()) + T
        limit = min(self.config.max_position_embeddings, kv_cache.capacity)
        if key_length > limit:
            raise ValueError(f"a cache row would hold {key_length} tokens, over its limit of {limit}")
        x, maps = self.forward_at(input_ids, start, kv_cache.keys, kv_cache.values, key_length, need_weights)
        kv_cache.positions += T  # in place: a view from KVCache.rows advances its parent too
        return (x, maps) if need_weights else x

    def forward_at(
        self,
        input_ids: torch.Tensor,
        start: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        key_length: int,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids (B, T) written at per-row positions start (B,) of the slot caches keys / values, each query
        attending over the first `key_length` slots up to its own position -> (hidden (B, T, C), maps). Checks and
        advances nothing: with key_length the cache's whole capacity, every shape is fixed (the compiled decode
        step, model/generation.py)."""
        T = input_ids.shape[1]
        position_ids = start[:, None] + torch.arange(T, device=input_ids.device)  # (B, T)
        mask = slot_attention_mask(start, T, key_length)
        x = self.embeddings(input_ids, position_ids)  # (B, T, C)
        rope = self._rope(position_ids)
        maps = []
        for i, layer in enumerate(self.layers):
            x, weights = layer(x, mask, (keys[i], values[i], start), need_weights, rope)
            if need_weights:
                maps.append(weights)
        return self.ln_f(x), maps


class NanoLMHead(nn.Module):
    """Projection to the vocabulary; its weight is the token embedding's (tied), so it adds no parameters."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)  # (B, T, V)


class NanoLM(nn.Module):
    """NanoModel + NanoLMHead: logits for every position."""

    def __init__(self, config: NanoConfig):
        super().__init__()
        self.config = config
        self.transformer = NanoModel(config)
        self.lm_head = NanoLMHead(self.transformer.embeddings.token)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance
        # does not grow with depth at initialisation.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) or None -> logits (B, T, V)."""
        return self.lm_head(self.transformer(input_ids, attention_mask))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (the tied head counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.transformer.embeddings.position is not None:
            n -= self.transformer.embeddings.position.weight.numel()
        return n

    def set_dropout(self, p: float) -> None:
        """Change every dropout rate in place (stages may train with a different rate than pretraining)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {p}")
        self.config.dropout = p
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, NanoSelfAttention):
                m.dropout = p

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L T C."""
        T = seq_len or self.config.block_size
        c = self.config
        return 6 * self.num_parameters(exclude_embeddings=True) + 12 * c.n_layer * T * c.n_embd

    @torch.no_grad()
    def attention_maps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per layer, the (B, H, T, T) attention weights."""
        _, maps = self.transformer(input_ids, attention_mask, need_weights=True)
        return maps

    def get_attention_maps(self, text: str, tokenizer=None) -> list[torch.Tensor]:
        """Attention maps for one text: per layer, (H, T, T).

        The tokenizer defaults to the one `from_pretrained` found beside the weights.
        """
        tokenizer = tokenizer or getattr(self, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "get_attention_maps needs a tokenizer: pass one, or load the model from a directory with tokenizer.json"
            )
        ids = torch.tensor([tokenizer.encode(text)[: self.config.max_position_embeddings]], dtype=torch.long)
        was_training = self.training
        self.eval()
        try:
            maps = self.attention_maps(ids.to(self.lm_head.weight.device))
        finally:
            self.train(was_training)
        return [m[0].float().cpu() for m in maps]

    def save_pretrained(self, directory: str | Path, tokenizer: NanoTokenizer | None = None) -> Path:
        """Write config.json and model.safetensors (tied weights stored once). With the tokenizer the weights were
        trained with, tokenizer.json too, and its fingerprint in config.json: `model.io.load_pretrained` then
        refuses any other tokenizer.json put beside these weights."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_FILE, tokenizer.fingerprint() if tokenizer is not None else None)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(directory / TOKENIZER_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> NanoLM:
        """Rebuild from a directory written by save_pretrained; safetensors only, so no code runs. A damaged
        config.json or model.safetensors is a ValueError naming the file, raised before the model is allocated."""
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} not found: not a model directory written by save_pretrained"
                )
        config = NanoConfig.load(directory / CONFIG_FILE)
        state = load_weights_file(directory / WEIGHTS_FILE, map_location)
        model = cls(config)
        load_state_checked(model, state, source=str(directory / WEIGHTS_FILE))
        if (directory / TOKENIZER_FILE).is_file():
            from neuraflux.tokenizer import NanoTokenizer

            model.tokenizer = NanoTokenizer.load(directory / TOKENIZER_FILE)  # a plain attribute, not a module
        return model


def load_weights_file(path: Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; ValueError naming the file when it is truncated or not safetensors."""
    from safetensors.torch import load_file

    with weights_file_errors(path):
        return load_file(str(path), device=map_location)


def check_weights_file(path: Path) -> None:
    """`load_weights_file`'s checks without reading a tensor: the header parses and the file holds every byte it
    promises."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a model directory written by save_pretrained")
    with weights_file_errors(path), safe_open(str(path), "pt"):
        pass


@contextmanager
def weights_file_errors(path: Path) -> Iterator[None]:
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        raise ValueError(f"{path} is unreadable (truncated or not safetensors): {err}") from None


def load_state_checked(model: NanoLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, naming the vocabulary or shape mismatch instead of PyTorch's long size dump."""
    own = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    vocab_key = "transformer.embeddings.token.weight"
    if state[vocab_key].shape[0] != own[vocab_key].shape[0]:
        raise ValueError(
            f"{source}: vocabulary size {state[vocab_key].shape[0]} does not match the config's "
            f"model.vocab_size={own[vocab_key].shape[0]}"
        )
    for key, tensor in own.items():
        if state[key].shape != tensor.shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, the config expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=False)
