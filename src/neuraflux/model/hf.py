"""The Hugging Face transformers format: a NanoLM written as a checkpoint that `AutoModelForCausalLM` and
`AutoTokenizer` load without custom code, and such a checkpoint read back into a NanoLM.

The backbone is exactly one of two stock architectures, chosen by `model.position_encoding`:

- "learned": GPT-2 (`GPT2LMHeadModel`). Pre-LayerNorm blocks, exact-erf GELU (`activation_function="gelu"`, not
  GPT-2's own tanh form), tied head. GPT-2's Conv1D stores each weight as (in, out): ours are transposed.
- "rope": GPT-NeoX (`GPTNeoXForCausalLM`) with `use_parallel_residual=False` (x + attn(ln(x)), then x + mlp(ln(x)))
  and rotary on every head dimension (partial_rotary_factor 1.0). Its rotation pairs dimension i with i + D/2
  (`rotate_half`), as `nano.apply_rope` does, so queries and keys need no permutation; but its fused projection
  lays the output rows out per head, (H, 3, D), where ours is (3, H, D).

`model.bias=False` is written with zero biases where the architecture always has them (LayerNorm; GPT-2's linear
layers; GPT-NeoX's MLP): the same function. Reading back, a recorded bias=False whose biases are still zero comes
back without them; biases trained away from zero come back as a bias=True model, which is what the weights are.

Only exporting needs `transformers` (for its config classes); reading a checkpoint back needs only safetensors,
so `stage.init_from` can start from one without the extra. Everything this module raises names the file or the
setting; the command line turns it into one line.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch

from neuraflux.chat import ASSISTANT, BOS, CONTEXT, END, EOS, ESCAPE, PAD, SPECIAL_TOKENS, UNK, USER
from neuraflux.model.config import NanoConfig, read_config_file
from neuraflux.model.nano import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    NanoLM,
    check_weights_file,
    load_state_checked,
    load_weights_file,
)
from neuraflux.tokenizer import NanoTokenizer

EXTRA = "bench"  # the pyproject extra that installs transformers
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SHARDED_INDEX_FILE = "model.safetensors.index.json"
# Beside transformers' own keys in config.json: the NanoConfig the weights were exported from (block_size, bias and
# the tokenizer fingerprint have no transformers key), so reading the checkpoint back rebuilds exactly that model.
RECORD_KEY = "neuraflux"
# The NanoConfig fields this module maps. A field added to NanoConfig later is refused on export until it is
# mapped here, instead of being silently dropped from the exported model.
MAPPED_FIELDS = frozenset(
    {
        "vocab_size",
        "block_size",
        "max_position_embeddings",
        "n_layer",
        "n_head",
        "n_embd",
        "dropout",
        "bias",
        "layer_norm_eps",
        "pad_token_id",
        "position_encoding",
        "rope_theta",
    }
)
ARCHITECTURES = {"learned": ("gpt2", "GPT2LMHeadModel"), "rope": ("gpt_neox", "GPTNeoXForCausalLM")}
OPTIONAL_BIASES = ("attention.query_key_value", "attention.dense")  # GPT-NeoX's attention_bias=False drops them
# buffers older transformers versions saved beside the weights: causal masks and rotary frequencies, no parameters
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", ".inv_freq")


def require_transformers():
    """The transformers module, or an ImportError naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise ImportError(
            f"exporting to the transformers format needs the `transformers` package: pip install 'neuraflux[{EXTRA}]'"
        ) from None
    return transformers


# ---- the chat format as a Jinja template -------------------------------------------------------------------------


def chat_template() -> str:
    """`chat.render_prompt` (add_generation_prompt=True) and a training example, `render_prompt(messages[:-1]) +
    render_completion(last)` (add_generation_prompt=False, the conversation ending with the assistant), in Jinja.

    Roles: user, assistant, context (a retrieved document), and system, which reads as a context turn as the server
    reads it. A `context=` keyword of `apply_chat_template` is the context turn before all others. Every content is
    escaped as `chat.escape_special` does: a zero-width space after the `<` of each special-token string. Tokens never
    overlap (none holds a `<` after its first character), so replacing them one by one equals its regex."""
    escape = "".join(f"|replace('{t}', '<{ESCAPE}{t[1:]}')" for t in (*SPECIAL_TOKENS, UNK))
    return (
        f"{{%- macro esc(text) -%}}{{{{ text{escape} }}}}{{%- endmacro -%}}"
        f"{{{{- '{BOS}' -}}}}"
        f"{{%- if context is defined and context -%}}{{{{- '{CONTEXT}' + esc(context) + '{END}' -}}}}{{%- endif -%}}"
        "{%- for message in messages -%}"
        f"{{%- if message['role'] == 'user' -%}}{{%- set tag = '{USER}' -%}}"
        f"{{%- elif message['role'] == 'assistant' -%}}{{%- set tag = '{ASSISTANT}' -%}}"
        f"{{%- elif message['role'] in ['context', 'system'] -%}}{{%- set tag = '{CONTEXT}' -%}}"
        "{%- else -%}{{- raise_exception('role ' + message['role'] + ' is not user, assistant, context or system') -}}"
        "{%- endif -%}"
        f"{{{{- tag + esc(message['content']) + '{END}' -}}}}"
        "{%- if loop.last and message['role'] == 'assistant' and not add_generation_prompt -%}"
        f"{{{{- '{EOS}' -}}}}{{%- endif -%}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- '{ASSISTANT}' -}}}}{{%- endif -%}}"
    )


# ---- the tokenizer -----------------------------------------------------------------------------------------------


def tokenizer_json(tokenizer: NanoTokenizer) -> str:
    """tokenizer.json for `tokenizers` (what a fast tokenizer loads). Byte-level BPE is already one; a character
    vocabulary becomes a WordLevel model over single characters, with the same ids (unknown characters to
    `<|unk|>`, special-token strings in text to their ids, as `NanoTokenizer.encode` does)."""
    if tokenizer.mode == "bpe":
        return tokenizer.to_json()
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = json.loads(tokenizer.to_json())["vocab"]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    # characters joined as they are (no spaces between them), an unknown one as U+FFFD, as NanoTokenizer.decode does
    backend.decoder = decoders.Sequence([decoders.Replace(UNK, "\ufffd"), decoders.Fuse()])
    # already in the vocabulary, so they keep their ids; <|unk|> as an ordinary token, which NanoTokenizer.decode
    # shows (as U+FFFD) even when it skips special tokens
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.add_tokens([AddedToken(UNK, special=False, normalized=False)])
    return backend.to_str(pretty=True)


def tokenizer_from_json(text: str, path: Path) -> NanoTokenizer:
    """The NanoTokenizer a transformers tokenizer.json holds: byte-level BPE as it is, a WordLevel vocabulary of
    single characters (what `tokenizer_json` writes for character mode) as a character tokenizer. ValueError naming
    the file for anything else, or a vocabulary without NeuraFlux's special tokens."""
    try:
        data = json.loads(text)
        if (data.get("model") or {}).get("type") == "WordLevel":
            vocab = data["model"]["vocab"]
            chars = sorted(vocab, key=vocab.get)
            specials = {*SPECIAL_TOKENS, UNK}
            if [vocab[c] for c in chars] != list(range(len(chars))) or any(
                len(c) != 1 for c in chars if c not in specials
            ):
                raise ValueError("a WordLevel vocabulary that is not one id per character, numbered from 0")
            return NanoTokenizer(char_vocab=chars)
        return NanoTokenizer.from_json(text)
    except KeyError as err:
        raise ValueError(f"{path}: not a NeuraFlux tokenizer: {err.args[0]}") from None
    except Exception as err:  # JSON, the tokenizers library's own parse errors
        raise ValueError(f"{path} is unreadable as a NeuraFlux tokenizer: {type(err).__name__}: {err}") from None


def tokenizer_config(config: NanoConfig) -> dict:
    """tokenizer_config.json: the special tokens by role, and the chat template."""
    data = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [USER, ASSISTANT, CONTEXT, END],
        "clean_up_tokenization_spaces": False,  # decode as NanoTokenizer does: no space removed before punctuation
        "model_max_length": config.max_position_embeddings,
        "chat_template": chat_template(),
    }
    return data


# ---- config and weights ------------------------------------------------------------------------------------------


def transformers_config(config: NanoConfig, tokenizer: NanoTokenizer) -> dict:
    """config.json of the transformers architecture that computes exactly what `config` does. ValueError naming
    the setting that none can represent."""
    unmapped = sorted({f.name for f in fields(NanoConfig)} - MAPPED_FIELDS)
    if unmapped:
        raise ValueError(f"model.{unmapped[0]} has no transformers equivalent in this exporter; nothing was written")
    model_type, architecture = ARCHITECTURES[config.position_encoding]
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    shared = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": True,
        **ids,
        RECORD_KEY: {**config.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint()},
    }
    if model_type == "gpt2":
        return {
            **shared,
            "n_positions": config.max_position_embeddings,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": 4 * config.n_embd,
            "activation_function": "gelu",  # exact erf GELU, as nn.GELU(); GPT-2's default is the tanh form
            "layer_norm_epsilon": config.layer_norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
        }
    return {
        **shared,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "intermediate_size": 4 * config.n_embd,
        "hidden_act": "gelu",
        "max_position_embeddings": config.max_position_embeddings,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_dropout": config.dropout,
        "attention_dropout": config.dropout,
        "use_parallel_residual": False,
        "attention_bias": config.bias,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": 1.0},
    }


def legacy_keys(config: NanoConfig) -> dict:
    """The rotary settings again under the names transformers 4.x reads, whose default rotary_pct of 0.25 would
    otherwise rotate a quarter of each head there. transformers 5 reads `rope_parameters` and drops these when it
    writes a config, so they are added to the written file."""
    if config.position_encoding != "rope":
        return {}
    return {"rotary_pct": 1.0, "rotary_emb_base": config.rope_theta}


def module_names(config: NanoConfig) -> list[tuple[str, str]]:
    """(NanoLM module, transformers module) for every module with weights, in `config`'s architecture."""
    gpt2 = config.position_encoding == "learned"
    t = "transformer" if gpt2 else "gpt_neox"
    names = [("transformer.embeddings.token", f"{t}.wte" if gpt2 else f"{t}.embed_in")]
    if gpt2:
        names.append(("transformer.embeddings.position", f"{t}.wpe"))
    per_layer = (
        {"ln_1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln_2": "ln_2",
         "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
        if gpt2 else
        {"ln_1": "input_layernorm", "attn.qkv": "attention.query_key_value", "attn.proj": "attention.dense",
         "ln_2": "post_attention_layernorm", "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}
    )  # fmt: skip
    for i in range(config.n_layer):
        ours, theirs = f"transformer.layers.{i}.", f"{t}.{'h' if gpt2 else 'layers'}.{i}."
        names += [(ours + a, theirs + b) for a, b in per_layer.items()]
    names.append(("transformer.ln_f", f"{t}.ln_f" if gpt2 else f"{t}.final_layer_norm"))
    return names


def has_bias(transformers_module: str, config: NanoConfig) -> bool:
    """Whether the exported architecture has a bias on this module: embeddings never do, GPT-NeoX's attention only
    with attention_bias (config.bias), everything else always."""
    if transformers_module.endswith((".wte", ".wpe", ".embed_in")):
        return False
    return config.bias or not transformers_module.endswith(OPTIONAL_BIASES)


def to_transformers_layout(key: str, tensor: torch.Tensor, config: NanoConfig) -> torch.Tensor:
    """One NanoLM tensor in the transformers architecture's layout (see the module docstring)."""
    if config.position_encoding == "learned":
        linear = key.endswith((".qkv.weight", ".proj.weight", ".fc.weight"))
        return tensor.t() if linear else tensor  # Conv1D: (in, out)
    if ".qkv." in key:  # rows (3, H, D) -> (H, 3, D)
        H, D = config.n_head, config.head_dim
        return tensor.reshape(3, H, D, -1).transpose(0, 1).reshape(tensor.shape)
    return tensor


def from_transformers_layout(key: str, tensor: torch.Tensor, config: NanoConfig) -> torch.Tensor:
    """`to_transformers_layout` undone."""
    if config.position_encoding == "learned":
        return to_transformers_layout(key, tensor, config)  # a transpose is its own inverse
    if ".qkv." in key:  # rows (H, 3, D) -> (3, H, D)
        H, D = config.n_head, config.head_dim
        return tensor.reshape(H, 3, D, -1).transpose(0, 1).reshape(tensor.shape)
    return tensor


def to_transformers_state(model: NanoLM) -> dict[str, torch.Tensor]:
    """The NanoLM's weights under the transformers architecture's names and layouts (the tied head left out, as
    transformers saves it); a bias the NanoLM lacks is zero."""
    config, own = model.config, model.state_dict()
    state = {}
    for ours, theirs in module_names(config):
        weight = own[f"{ours}.weight"]
        state[f"{theirs}.weight"] = to_transformers_layout(f"{ours}.weight", weight, config)
        if has_bias(theirs, config):
            bias = own.get(f"{ours}.bias")
            bias = weight.new_zeros(weight.shape[0]) if bias is None else bias
            state[f"{theirs}.bias"] = to_transformers_layout(f"{ours}.bias", bias, config)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def from_transformers_state(state: dict[str, torch.Tensor], config: NanoConfig, source: str) -> NanoConfig:
    """Rename a transformers state dict, in place, to NanoLM keys and layouts; returns the config that holds it:
    bias=True when a bias-free config meets biases that are not zero. ValueError naming the first tensor that has
    no place in a NanoLM, or an untied output head."""
    for key in [k for k in state if k.endswith(IGNORED_SUFFIXES)]:
        del state[key]
    prefix = "transformer." if config.position_encoding == "learned" else "gpt_neox."
    if not any(k.startswith(prefix) for k in state):  # checkpoints saved from the bare model, without the LM head
        for key in list(state):
            state[prefix + key] = state.pop(key)
    names = module_names(config)
    embedding = f"{names[0][1]}.weight"
    for head in ("lm_head.weight", "embed_out.weight"):
        if head in state:
            if embedding in state and not torch.equal(state[head], state[embedding]):
                raise ValueError(f"{source}: {head} differs from {embedding}; a NanoLM ties its head to its embedding")
            del state[head]
    biases = [state.get(f"{theirs}.bias") for _, theirs in names]
    bias = config.bias or any(b is not None and bool(b.any()) for b in biases)
    if bias != config.bias:
        config = NanoConfig.from_dict({**config.to_dict(), "bias": bias})
    out = {}
    for ours, theirs in names:
        weight = state.pop(f"{theirs}.weight", None)
        if weight is None:
            raise ValueError(f"{source}: no tensor {theirs}.weight")
        out[f"{ours}.weight"] = from_transformers_layout(f"{ours}.weight", weight, config)
        if theirs.endswith((".wte", ".wpe", ".embed_in")):
            continue
        tensor = state.pop(f"{theirs}.bias", None)
        if not bias:
            continue  # absent or zero (checked above): the bias-free model computes the same
        if tensor is None:
            if not theirs.endswith(OPTIONAL_BIASES):
                raise ValueError(f"{source}: no tensor {theirs}.bias")
            tensor = weight.new_zeros(weight.shape[0])  # GPT-NeoX attention_bias=False: no bias is a zero bias
        out[f"{ours}.bias"] = from_transformers_layout(f"{ours}.bias", tensor, config)
    if state:
        raise ValueError(f"{source}: tensors a NanoLM has no place for: {sorted(state)[:5]}")
    state.update(out)
    return config


def nano_config(data: dict, tokenizer: NanoTokenizer, source: str) -> NanoConfig:
    """The NanoConfig of a transformers config.json: GPT-2 or GPT-NeoX, in NeuraFlux's block layout. ValueError
    naming the setting a NanoLM cannot compute exactly. Missing keys take transformers' defaults."""
    model_type = data.get("model_type")
    recorded = dict(data.get(RECORD_KEY) or {})
    recorded.pop("tokenizer_fingerprint", None)

    def require(key: str, got, wanted, why: str) -> None:
        if got != wanted:
            raise ValueError(f"{source}: {key}={got!r} cannot be loaded into a NanoLM: {why}")

    if model_type == "gpt2":
        n_embd = data.get("n_embd", 768)
        require("activation_function", data.get("activation_function", "gelu_new"), "gelu", "a NanoLM's GELU is exact")
        require("n_inner", data.get("n_inner") or 4 * n_embd, 4 * n_embd, "a NanoLM's MLP is 4 * n_embd wide")
        require("scale_attn_weights", data.get("scale_attn_weights", True), True, "a NanoLM divides by sqrt(D)")
        inverse = data.get("scale_attn_by_inverse_layer_idx", False)
        require("scale_attn_by_inverse_layer_idx", inverse, False, "a NanoLM scales every layer alike")
        require("add_cross_attention", data.get("add_cross_attention", False), False, "a NanoLM is decoder-only")
        dropouts = {data.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        shape = {
            "vocab_size": data.get("vocab_size", 50257),
            "max_position_embeddings": data.get("n_positions", 1024),
            "n_layer": data.get("n_layer", 12),
            "n_head": data.get("n_head", 12),
            "n_embd": n_embd,
            "layer_norm_eps": data.get("layer_norm_epsilon", 1e-5),
            "position_encoding": "learned",
        }
        tied = data.get("tie_word_embeddings", True)
    elif model_type == "gpt_neox":
        hidden = data.get("hidden_size", 6144)
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        require("hidden_act", data.get("hidden_act", "gelu"), "gelu", "a NanoLM's GELU is exact")
        require("intermediate_size", data.get("intermediate_size", 24576), 4 * hidden, "a NanoLM's MLP is 4 * C wide")
        parallel = data.get("use_parallel_residual", True)
        require("use_parallel_residual", parallel, False, "a NanoLM adds attention, then the MLP, to the stream")
        partial = rope.get("partial_rotary_factor", data.get("rotary_pct", 0.25))
        require("partial_rotary_factor", partial, 1.0, "a NanoLM rotates every dimension of a head")
        require("rope_type", rope.get("rope_type", rope.get("type", "default")), "default", "plain RoPE only")
        dropouts = {data.get(k, 0.0) for k in ("hidden_dropout", "attention_dropout")}
        shape = {
            "vocab_size": data.get("vocab_size", 50432),
            "max_position_embeddings": data.get("max_position_embeddings", 2048),
            "n_layer": data.get("num_hidden_layers", 44),
            "n_head": data.get("num_attention_heads", 64),
            "n_embd": hidden,
            "layer_norm_eps": data.get("layer_norm_eps", 1e-5),
            "position_encoding": "rope",
            "rope_theta": float(rope.get("rope_theta", data.get("rotary_emb_base", 10_000.0))),
        }
        tied = data.get("tie_word_embeddings", False)
    else:
        raise ValueError(
            f"{source}: model_type={model_type!r} cannot be loaded into a NanoLM (gpt2 and gpt_neox can, "
            "in NeuraFlux's layout)"
        )
    if not tied:
        raise ValueError(
            f"{source}: tie_word_embeddings=False cannot be loaded: a NanoLM ties its head to its embedding"
        )
    if len(dropouts) != 1:
        raise ValueError(f"{source}: dropout rates {sorted(dropouts)} differ; a NanoLM has one model.dropout")
    settings = {
        "block_size": shape["max_position_embeddings"],
        **recorded,
        **shape,
        "dropout": dropouts.pop(),
        "pad_token_id": tokenizer.pad_id if data.get("pad_token_id") is None else data["pad_token_id"],
    }
    settings["block_size"] = min(settings["block_size"], settings["max_position_embeddings"])
    try:
        return NanoConfig.from_dict(settings)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


# ---- reading a transformers checkpoint ---------------------------------------------------------------------------


def is_transformers_directory(directory: Path) -> bool:
    """A directory whose config.json is a transformers config (it names a model_type), not a NanoConfig."""
    try:
        data = json.loads((Path(directory) / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "model_type" in data  # NanoConfig.from_dict refuses the key


def weight_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json lists."""
    index = directory / SHARDED_INDEX_FILE
    if not (directory / WEIGHTS_FILE).is_file() and index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"{index} is unreadable: {type(err).__name__}: {err}") from None
        return [directory / name for name in shards]
    return [directory / WEIGHTS_FILE]


def inspect_transformers(directory: str | Path) -> tuple[NanoConfig, NanoTokenizer, str | None]:
    """The NanoConfig, the tokenizer and the tokenizer fingerprint the export recorded (None for a checkpoint from
    elsewhere) of a transformers checkpoint directory, every file checked but no tensor read. Errors name the file.
    `model.io.inspect_pretrained` calls this, then checks that the tokenizer fits the weights, as for its own
    directories."""
    directory = Path(directory)
    config_path, tokenizer_path = directory / CONFIG_FILE, directory / TOKENIZER_FILE
    data = read_config_file(config_path)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(
            f"{tokenizer_path} not found: a NanoLM needs the fast tokenizer (tokenizer.json) beside the weights"
        )
    tokenizer = tokenizer_from_json(tokenizer_path.read_text(), tokenizer_path)
    config = nano_config(data, tokenizer, str(config_path))
    for path in weight_files(directory):
        check_weights_file(path)
    return config, tokenizer, (data.get(RECORD_KEY) or {}).get("tokenizer_fingerprint")


def load_transformers(directory: str | Path, config: NanoConfig) -> NanoLM:
    """The NanoLM of a transformers GPT-2 / GPT-NeoX checkpoint directory whose config `inspect_transformers` read
    (safetensors only, so no code runs). ValueError naming the tensor a NanoLM cannot hold exactly."""
    directory = Path(directory)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        state.update(load_weights_file(path))
    config = from_transformers_state(state, config, str(directory))
    model = NanoLM(config)
    load_state_checked(model, {k: v.float() for k, v in state.items()}, source=str(directory))
    return model


# ---- writing one --------------------------------------------------------------------------------------------------


def write_transformers(model: NanoLM, tokenizer: NanoTokenizer, directory: str | Path) -> str:
    """Write config.json, generation_config.json, model.safetensors, tokenizer.json and tokenizer_config.json into
    `directory` (which must exist); returns the architecture's class name. Refuses, before writing anything, a
    config this module cannot represent."""
    from safetensors.torch import save_file

    transformers = require_transformers()
    directory = Path(directory)
    hf = transformers_config(model.config, tokenizer)
    config_class = transformers.GPT2Config if hf["model_type"] == "gpt2" else transformers.GPTNeoXConfig
    stops = [tokenizer.end_id, tokenizer.eos_id]  # a chat answer ends its turn with <|end|>, a text with <|eos|>
    generation = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_id, eos_token_id=stops, pad_token_id=tokenizer.pad_id
    )
    config_class(**hf).save_pretrained(directory)
    written = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps({**written, **legacy_keys(model.config)}, indent=2) + "\n")
    generation.save_pretrained(directory)
    save_file(to_transformers_state(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / TOKENIZER_FILE).write_text(tokenizer_json(tokenizer))
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config(model.config), indent=2) + "\n")
    return hf["architectures"][0]
