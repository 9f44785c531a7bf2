"""Reading a Hugging Face ``config.json`` into a packvit config dataclass, strictly.

A field the file lacks takes transformers' default for that model type, read from transformers'
own config class (what ``from_pretrained`` would build), never packvit's preset; without
transformers installed, a missing field is an error naming it. Every value is type-checked.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

# Fields every transformers config may carry (generation defaults, labels, bookkeeping of
# transformers 4.x and 5.x). None of them changes a vision encoder's forward pass.
GENERIC_FIELDS = frozenset(
    """
    _name_or_path architectures model_type transformers_version torch_dtype dtype auto_map
    _attn_implementation _attn_implementation_autoset _commit_hash initializer_range initializer_factor
    id2label label2id num_labels problem_type return_dict output_hidden_states output_attentions
    torchscript use_bfloat16 tf_legacy_loss pruned_heads tie_word_embeddings chunk_size_feed_forward
    is_encoder_decoder is_decoder cross_attention_hidden_size add_cross_attention tie_encoder_decoder
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens finetuning_task
    tokenizer_class prefix bos_token_id pad_token_id eos_token_id sep_token_id decoder_start_token_id
    task_specific_params base_config_key use_cache
    """.split()
)


@functools.lru_cache(maxsize=8)
def transformers_defaults(model_type: str) -> object | None:
    """A default instance of transformers' config class for ``model_type``; None without transformers."""
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        return None
    try:
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        return None  # a transformers too old to know the model: the fields must then be given
    return cls()


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_types(cls, values: dict, where: str, names: dict[str, str] | None = None) -> None:
    """Every value has its dataclass field's type (``int``, ``float``, ``bool``, ``str``, ``X | None``):
    a ``"64"`` or ``true`` where a number belongs is a broken file, not something to coerce."""
    names = names or {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        spec = str(f.type).replace(" ", "").split("|")
        if v is None and "None" in spec:
            continue
        ok = any(
            isinstance(v, t) and not (isinstance(v, bool) and s != "bool") for s in spec for t in _TYPES.get(s, ())
        )
        if not ok:
            want = " or ".join("null" if s == "None" else s for s in spec)
            raise ValueError(f"{where}: field {names.get(f.name, f.name)} must be {want}, got {v!r}")


def parse_fields(
    d: dict,
    fields: dict[str, str],
    ignored: set[str],
    *,
    family: str,
    strict: bool = True,
    model_type: str | None = None,
    config_class=None,
) -> dict:
    """Map HF field names to dataclass fields; an unknown field is an error (a warning if not strict).

    With ``model_type``, fields ``d`` lacks take transformers' defaults for it (or are an error when
    transformers is not installed); with ``config_class``, every value is type-checked.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{family} config.json: expected an object of fields, got a {type(d).__name__}")
    unknown = sorted(set(d) - set(fields) - set(ignored) - GENERIC_FIELDS)
    if unknown:
        msg = (
            f"{family} config.json has fields packvit does not understand: {unknown}. They may change the "
            "model; refusing to guess (pass strict_config=False to ignore them)"
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)
    nullable = set()
    if config_class is not None:
        nullable = {f.name for f in dataclasses.fields(config_class) if "None" in str(f.type)}
    kw, missing = {}, []
    for hf_name, name in fields.items():
        if hf_name in d and (d[hf_name] is not None or name in nullable):
            v = d[hf_name]
            if isinstance(v, (list, tuple)):  # patch_size may be written [p, p]
                if len(set(map(repr, v))) != 1:
                    raise ValueError(f"{family} config.json: non-square {hf_name}={v} is not supported")
                v = v[0]
            kw[name] = v
        else:
            missing.append(hf_name)
    if missing and model_type is not None:
        defaults = transformers_defaults(model_type)
        lacking = [m for m in missing if defaults is None or not hasattr(defaults, m)]
        if lacking:
            raise ValueError(
                f"{family} config.json lacks {lacking}; packvit takes a missing field from transformers' "
                f"{model_type!r} defaults, and {'transformers is not installed' if defaults is None else 'transformers has none'}"
                ": add the field to config.json (or install transformers)"
            )
        for m in missing:
            v = getattr(defaults, m)
            kw[fields[m]] = v[0] if isinstance(v, (list, tuple)) else v
    if config_class is not None:
        check_types(config_class, kw, f"{family} config.json", {v: k for k, v in fields.items()})
    return kw
