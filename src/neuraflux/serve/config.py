"""ServeConfig: the server's settings, their defaults here, then conf/serve/default.yaml, then `key=value`
overrides, then the environment (the API key)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from neuraflux.model.quantize import MODES as QUANT_MODES
from neuraflux.paths import conf_file

DEFAULT_CONFIG = conf_file("serve", "default.yaml")
API_KEY_ENV = "NEURAFLUX_API_KEY"


@dataclass
class ServeConfig:
    """The server's settings, defaults included: `conf/serve/default.yaml` (or `--config`) sets what a deployment
    changes, and `key=value` on the command line overrides either."""

    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8000
    model_name: str | None = None  # id shown by /v1/models; None: the model directory's name
    max_prompt_tokens: int = 384  # capped at the model's max_position_embeddings - 1
    max_new_tokens: int = 256  # the most a request may ask for
    default_max_new_tokens: int = 64  # when a request does not say
    max_concurrent: int = 8  # requests decoding together (KV cache slots)
    max_queue: int = 32  # requests waiting for a slot; beyond it: an `overloaded` error
    request_timeout_s: float = 120.0
    api_key: str | None = None  # bearer token; env NEURAFLUX_API_KEY when None
    retrieval: str | None = None  # None, `world` (the built-in world's documents) or a Retriever.save directory
    retrieval_k: int | None = None  # documents in a prompt's context; None: conf/retrieval/default.yaml's k
    # the constitutional filter: None (off), `default` (conf/constitution/default.yaml) or a constitution YAML
    # path. On: each response is held back, checked whole (revised if it breaks a principle), sent as one message
    constitution: str | None = None
    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = 0.95
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None: torch's default
    quantize: str | None = None  # None (the model's float weights), int8 or int8-dynamic (model/quantize.py)
    # decode with generation's torch.compile'd step (model/generation.py) over a power-of-two number of slots and of
    # keys: each such shape compiles (seconds) when the traffic first reaches it (docs/SERVING.md)
    compile: bool = False
    # what a request may cost before a route runs (serve/guard.py): bytes of an HTTP body or a WebSocket message,
    # and seconds for a request's headers, then its body, to arrive
    max_body_bytes: int = 1_000_000
    read_timeout_s: float = 10.0
    # `Host` names answered (null: loopback names when bound to loopback, else any; ["*"]: any) and web origins
    # besides the server's own that may call it (a request without an Origin header, not from a browser, always may)
    allowed_hosts: list[str] | None = None
    allowed_origins: list[str] | None = None
    # human feedback (serve/feedback.py): a SQLite file that keeps every answer and the votes on it (null: off, and
    # the feedback endpoints answer `feedback_disabled`); the longest comment or edit taken, in characters; and how
    # long a write waits for another process's lock before answering `feedback_unavailable`
    feedback_db: str | None = None
    max_feedback_chars: int = 8000
    feedback_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "max_prompt_tokens", "max_new_tokens", "default_max_new_tokens", "max_concurrent", "max_body_bytes",
            "max_feedback_chars",
        ):  # fmt: skip
            _positive_int(name, getattr(self, name))
        if self.retrieval_k is not None:
            _positive_int("retrieval_k", self.retrieval_k)
        if not (isinstance(self.read_timeout_s, int | float) and 0 < self.read_timeout_s < math.inf):
            raise ValueError(f"serve.read_timeout_s must be a positive number of seconds, got {self.read_timeout_s!r}")
        for name in ("allowed_hosts", "allowed_origins"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value)
            ):
                raise ValueError(f"serve.{name} must be a list of strings or null, got {value!r}")
        if not isinstance(self.max_queue, int) or isinstance(self.max_queue, bool) or self.max_queue < 0:
            raise ValueError(f"serve.max_queue must be an integer >= 0, got {self.max_queue!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"serve.compile must be true or false, got {self.compile!r}")
        if self.quantize is not None and self.quantize not in QUANT_MODES:
            raise ValueError(f"serve.quantize must be null or one of {', '.join(QUANT_MODES)}, got {self.quantize!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"serve.port must be in 1..65535, got {self.port}")
        if not (isinstance(self.request_timeout_s, int | float) and 0 < self.request_timeout_s < math.inf):
            raise ValueError(
                f"serve.request_timeout_s must be a positive number of seconds, got {self.request_timeout_s!r}"
            )
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"serve.default_max_new_tokens ({self.default_max_new_tokens}) must be <= serve.max_new_tokens "
                f"({self.max_new_tokens})"
            )
        if not self.temperature >= 0:
            raise ValueError(f"serve.temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None:
            _positive_int("top_k", self.top_k)
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"serve.top_p must be in (0, 1] or null, got {self.top_p}")
        if self.threads is not None:
            _positive_int("threads", self.threads)
        if self.api_key == "":
            raise ValueError("serve.api_key is empty: give a token or leave it null")
        if self.feedback_db == "":
            raise ValueError("serve.feedback_db is empty: give a SQLite file path, or leave it null (feedback off)")
        if not (isinstance(self.feedback_timeout_s, int | float) and 0 < self.feedback_timeout_s < math.inf):
            raise ValueError(
                f"serve.feedback_timeout_s must be a positive number of seconds, got {self.feedback_timeout_s!r}"
            )
        if self.constitution == "":
            raise ValueError("serve.constitution is empty: give `default`, a constitution YAML path, or leave it null")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"serve.{name} must be a positive integer, got {value!r}")


def load_serve_config(overrides: list[str] | None = None, path: Path | None = DEFAULT_CONFIG) -> ServeConfig:
    """Defaults, then the YAML at `path` (skipped when None or absent: an installed wheel has no conf/), then
    `key=value` overrides; api_key falls back to $NEURAFLUX_API_KEY."""
    merged = OmegaConf.structured(ServeConfig)
    try:
        if path is not None and Path(path).is_file():
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value; keys: {[f.name for f in fields(ServeConfig)]}")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as err:
        # OmegaConf's message names the key; drop its multi-line object dump
        key = getattr(err, "full_key", None)
        where = f"serve.{key}: " if key else "serve config: "
        raise ValueError(where + str(err).splitlines()[0]) from None
    values = OmegaConf.to_container(merged)
    if values["api_key"] is None and os.environ.get(API_KEY_ENV):
        values["api_key"] = os.environ[API_KEY_ENV]
    return ServeConfig(**values)
