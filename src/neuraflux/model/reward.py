"""NanoRewardModel: the shared backbone plus a scalar head read at each sequence's last real token, optionally
plus a learned multiple of the response's log-likelihood under the backbone's own (tied) LM head.

A saved reward model is a model directory whose `config.json` and `model.safetensors` hold the backbone exactly
as `NanoLM.save_pretrained` writes it, plus `reward_head.safetensors` and the marker `reward_model.json`. So the
backbone can be read by anything that reads model directories, while `NanoRewardModel.from_pretrained` refuses
a directory without the marker (a policy passed where a reward model belongs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from neuraflux.alignment.losses import token_logprobs
from neuraflux.masking import last_token_index, masked_mean
from neuraflux.model.config import NanoConfig
from neuraflux.model.nano import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, NanoLM, NanoModel, load_weights_file

if TYPE_CHECKING:
    from neuraflux.tokenizer import NanoTokenizer

MARKER_FILE = "reward_model.json"
HEAD_FILE = "reward_head.safetensors"
FORMAT = "neuraflux-reward-model-v1"
HEAD_PREFIX = "score_head."
LOGLIK_KEY = "loglik_weight"


def response_target_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, start_id: int) -> torch.Tensor:
    """`(B, T)` ids and bool mask -> `(B, T - 1)` bool, True where target `t` (token `t + 1`) is a real token after
    the row's last `start_id` (the chat format's assistant token). A row without `start_id` has no True."""
    is_start = input_ids == start_id
    has_start = is_start.any(dim=-1)
    T = input_ids.shape[1]
    last_start = T - 1 - is_start.flip(-1).int().argmax(dim=-1)  # (B,)
    after = torch.arange(T, device=input_ids.device)[None] > last_start[:, None]  # (B, T)
    return (after & attention_mask & has_start[:, None])[:, 1:]


def check_same_tokenizer(a, b, what: str) -> None:
    """Raise when two tokenizers' vocabularies differ: a reward model reads the policy's token ids directly."""
    fa, fb = a.fingerprint(), b.fingerprint()
    if fa != fb:
        raise ValueError(
            f"{what}: its tokenizer (fingerprint {fa}, {a.vocab_size} tokens) is not the policy's "
            f"(fingerprint {fb}, {b.vocab_size} tokens); train the reward model from the same SFT model so "
            "both read the same token ids"
        )


class NanoRewardModel(nn.Module):
    """`NanoModel` backbone + `Linear(C, 1)`: one scalar score per sequence.

    With `response_token_id` set, the score adds `loglik_weight * log p(response) / n`, the mean log-prob of the n
    tokens after the last `response_token_id` under the backbone's tied LM head. An SFT backbone already ranks a
    right answer above a wrong value far more often than a fresh head read at one token learns to from a few
    hundred pairs (docs/BENCHMARKS.md, "Reward models"), so the head gets that ranking as a feature.
    """

    def __init__(
        self,
        config: NanoConfig,
        transformer: NanoModel | None = None,
        response_token_id: int | None = None,
        loglik_weight: float = 0.0,
    ):
        super().__init__()
        self.config = config
        self.response_token_id = response_token_id
        # A fresh backbone gets NanoLM's initialisation (scaled residual projections).
        self.transformer = transformer if transformer is not None else NanoLM(config).transformer
        self.score_head = nn.Linear(config.n_embd, 1)
        # Small weights and zero bias: initial scores are near 0, so the pairwise loss starts near log 2.
        nn.init.normal_(self.score_head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.score_head.bias)
        # Used only when response_token_id is set. Adam moves a scalar by about lr a step, so a weight that starts at
        # 0 stays near 0 over a few hundred steps: the stage starts it at a useful size instead.
        self.loglik_weight = nn.Parameter(torch.tensor(float(loglik_weight)))
        # True when trained on prompts given retrieved context (`data.retrieve_context`): whoever scores with it must
        # give context-less prompts the same (`neuraflux.feedback.rewards.RewardModelReward`)
        self.retrieve_context = False
        # with retrieve_context: the settings its world store was built with (RetrievalSettings.to_dict(); None for
        # the defaults), so scoring searches the same store
        self.retrieval: dict | None = None

    @classmethod
    def from_lm(
        cls, source: NanoLM | str | Path, response_token_id: int | None = None, loglik_weight: float = 0.0
    ) -> NanoRewardModel:
        """A reward model on an LM's backbone (an SFT model, usually), with a fresh head.

        Given a NanoLM, the backbone is that LM's own module, not a copy: training the reward model changes the
        LM (pass `copy.deepcopy(lm)` to keep it). Given a path, the model directory is loaded.
        """
        lm = source if isinstance(source, NanoLM) else NanoLM.from_pretrained(source)
        return cls(
            lm.config, transformer=lm.transformer, response_token_id=response_token_id, loglik_weight=loglik_weight
        )

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) bool or None (nothing padded) -> scores (B,) float32."""
        B, T = input_ids.shape
        if attention_mask is None:
            last = torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
            hidden = self.transformer(input_ids)  # (B, T, C)
        else:
            if attention_mask.dtype != torch.bool or attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must be a (B, T) bool tensor like input_ids, got "
                                 f"{attention_mask.dtype} {tuple(attention_mask.shape)}")  # fmt: skip
            empty = ~attention_mask.any(dim=-1)
            if bool(empty.any()):
                raise ValueError(f"attention_mask rows {empty.nonzero().flatten().tolist()} have no token to score")
            last = last_token_index(attention_mask)
            hidden = self.transformer(input_ids, attention_mask)  # right padding takes the fused causal path
        picked = hidden[torch.arange(B, device=input_ids.device), last]  # (B, C)
        scores = self.score_head(picked).squeeze(-1).float()
        if self.response_token_id is None:
            return scores
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        # Only the N response positions go through the tied LM head: the prompt is most of each sequence.
        response = response_target_mask(input_ids, mask, self.response_token_id)  # (B, T - 1)
        rows, cols = response.nonzero(as_tuple=True)
        logits = F.linear(hidden[rows, cols], self.transformer.embeddings.token.weight)  # (N, V)
        logp = token_logprobs(logits[None], input_ids[rows, cols + 1][None])[0]  # (N,)
        per_token = torch.zeros(response.shape, dtype=logp.dtype, device=logp.device).index_put((rows, cols), logp)
        # the mean, not the sum: a summed log-likelihood falls with every token, so a policy scored by it would
        # learn to answer short (PPO's reward_source=both) whatever the answer says
        return scores + self.loglik_weight * masked_mean(per_token, response, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.score(input_ids, attention_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path, tokenizer: NanoTokenizer | None = None) -> Path:
        """Write config.json and model.safetensors (the backbone, as NanoLM writes it), the head and the marker;
        with a tokenizer, tokenizer.json and its fingerprint in config.json, as `NanoLM.save_pretrained` does."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_FILE, tokenizer.fingerprint() if tokenizer is not None else None)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        is_head = lambda k: k.startswith(HEAD_PREFIX) or k == LOGLIK_KEY  # noqa: E731
        backbone = {k: v for k, v in state.items() if not is_head(k)}
        head = {k: v for k, v in state.items() if is_head(k)}
        save_file(backbone, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        save_file(head, str(directory / HEAD_FILE), metadata={"format": "pt"})
        marker = {
            "format": FORMAT,
            "head": HEAD_FILE,
            "score": "last non-pad token",
            "response_token_id": self.response_token_id,
            "retrieve_context": self.retrieve_context,
            "retrieval": self.retrieval,
        }
        (directory / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(directory / TOKENIZER_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> NanoRewardModel:
        """Rebuild from a directory written by save_pretrained (safetensors only, so no code runs)."""
        directory = Path(directory)
        marker = directory / MARKER_FILE
        if not marker.is_file():
            raise FileNotFoundError(
                f"{directory} is not a reward model directory (no {MARKER_FILE}); a policy or SFT model "
                "becomes a reward model through stage=reward (NanoRewardModel.from_lm)"
            )
        try:
            meta = json.loads(marker.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{marker} is unreadable (truncated or not JSON): {err}") from None
        fmt = meta.get("format")
        if fmt != FORMAT:
            raise ValueError(f"{marker}: format {fmt!r} is not {FORMAT!r}")
        lm = NanoLM.from_pretrained(directory, map_location=map_location)  # checks config and backbone shapes
        model = cls(lm.config, transformer=lm.transformer, response_token_id=meta.get("response_token_id"))
        model.retrieve_context = bool(meta.get("retrieve_context", False))
        model.retrieval = meta.get("retrieval")
        head = load_weights_file(directory / HEAD_FILE, map_location)
        if LOGLIK_KEY in head:  # reward models saved before the likelihood feature have no weight: it stays 0
            model.loglik_weight.data.copy_(head.pop(LOGLIK_KEY))
        expected = {k: v.shape for k, v in model.score_head.state_dict().items()}
        got = {k.removeprefix(HEAD_PREFIX): v.shape for k, v in head.items()}
        if got != expected:
            raise ValueError(
                f"{directory / HEAD_FILE}: head tensors {dict(sorted(got.items()))} do not match the config's "
                f"{dict(sorted(expected.items()))}"
            )
        model.score_head.load_state_dict({k.removeprefix(HEAD_PREFIX): v for k, v in head.items()})
        return model
