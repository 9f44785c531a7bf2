"""Reading a Hugging Face ``config.json`` into a packvit config dataclass, strictly."""

from __future__ import annotations

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


def parse_fields(d: dict, fields: dict[str, str], ignored: set[str], *, family: str, strict: bool = True) -> dict:
    """Map HF field names to dataclass fields; an unknown field is an error (a warning if not strict)."""
    unknown = sorted(set(d) - set(fields) - set(ignored) - GENERIC_FIELDS)
    if unknown:
        msg = (
            f"{family} config.json has fields packvit does not understand: {unknown}. They may change the "
            "model; refusing to guess (pass strict_config=False to ignore them)"
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)
    kw = {}
    for hf_name, name in fields.items():
        if hf_name in d and d[hf_name] is not None:
            v = d[hf_name]
            if isinstance(v, (list, tuple)):  # patch_size may be written [p, p]
                if len(set(v)) != 1:
                    raise ValueError(f"{family} config.json: non-square {hf_name}={v} is not supported")
                v = v[0]
            kw[name] = v
    return kw
