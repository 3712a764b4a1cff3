"""Write a Llama model folder as one GGUF file, laid out as llama.cpp's convert_hf_to_gguf.py lays it out.

What llama.cpp expects of a Llama GGUF, and where each piece comes from here:
- tensor names from gguf's own TensorNameMap for MODEL_ARCH.LLAMA (blk.N.attn_q.weight, ...);
- q_proj and k_proj rows permuted per head (LlamaModel.permute: llama.cpp's rotary embedding pairs
  neighbouring dimensions, transformers' pairs the two halves of each head); transformers' GGUF loader
  applies the inverse when it reads the file back, which is how the read-back check sees a mistake;
- 1-D tensors (norms) in F32, 2-D weights in the chosen type; q8_0 falls back to F16 for rows whose
  length is not a multiple of its 32-value block, as llama.cpp does;
- a tied lm_head is left out (llama.cpp then reuses token_embd), and Llama 3.1-style rope scaling
  goes in as the rope_freqs tensor;
- the byte-level BPE vocabulary (tokens, token types, merges, special ids), the pre-tokenizer name that
  llama.cpp recognises by hashing the token ids of one probe text, and the training chat template.
"""
from __future__ import annotations

import json
import math
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np

from peftkit.export import ExportError

# convert_hf_to_gguf.get_vocab_base_pre: sha256 of str(tokenizer.encode(PROBE)) -> llama.cpp's pre-tokenizer name.
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
PROBE = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 '
         '333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= '
         'нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? '
         '\'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')


def write_gguf(model_dir: Path, path: Path, gguf_type: str, *, chat_template: str | None, stop_ids: list[int],
               tokenizer_pre: str | None = None) -> None:
    """Write the Llama model in model_dir to path as a GGUF file with 2-D weights in gguf_type."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise ExportError(f"{model_dir} is a {config.model_type!r} model; peftkit exports Llama-architecture models to GGUF "
                          "(for others use llama.cpp's convert_hf_to_gguf.py)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    write_hparams(writer, config, Path(model_dir).name, gguf_type)
    write_vocab(writer, tokenizer, model_dir, config.vocab_size, chat_template, stop_ids, tokenizer_pre)
    write_tensors(writer, model_dir, config, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_hparams(writer, config, name: str, gguf_type: str) -> None:
    """Add the Llama hyperparameters llama.cpp reads (convert_hf_to_gguf's TextModel + LlamaModel)."""
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_vocab(writer, tokenizer, model_dir: Path, vocab_size: int, chat_template: str | None, stop_ids: list[int],
                tokenizer_pre: str | None) -> None:
    """Add the byte-level BPE vocabulary as convert_hf_to_gguf's _set_vocab_gpt2 does, with the training template."""
    model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("merges"), list):
        raise ExportError(f"{model_dir}: the tokenizer is not a byte-level BPE (Llama 3, SmolLM2); peftkit exports those only, "
                          "use llama.cpp's convert_hf_to_gguf.py for sentencepiece tokenizers")
    tokens, types = vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre or pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.chat_template = chat_template or special.chat_template
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(adds_bos(tokenizer))
    if stop_ids:
        writer.add_eot_token_id(stop_ids[0])  # the template's end-of-turn token: llama.cpp stops on it


def vocab_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Return (tokens, token types) in id order, as convert_hf_to_gguf's get_vocab_base builds them."""
    kinds = gguf.TokenType
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(kinds.UNUSED)
        elif token in added:
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token if special else token.replace("\u2581", " "))
            types.append(kinds.CONTROL if special else kinds.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(kinds.NORMAL)
    return tokens, types


def pre_tokenizer(tokenizer) -> str:
    """Return llama.cpp's name for the tokenizer's pre-tokenizer, found as convert_hf_to_gguf finds it."""
    digest = sha256(str(tokenizer.encode(PROBE)).encode()).hexdigest()
    if digest not in KNOWN_PRE:
        raise ExportError(f"llama.cpp would not recognise this tokenizer's pre-tokenizer (probe hash {digest}); pass "
                          "--tokenizer-pre NAME with the name convert_hf_to_gguf.py's get_vocab_base_pre gives it")
    return KNOWN_PRE[digest]


def adds_bos(tokenizer) -> bool:
    """Return True when the tokenizer puts BOS in front of plain text (llama.cpp must do the same)."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def write_tensors(writer, model_dir: Path, config, gguf_type: str) -> None:
    """Add every weight under its llama.cpp name, q and k permuted, 2-D weights in gguf_type."""
    from safetensors import safe_open

    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for file in weight_files(Path(model_dir)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name == "lm_head.weight" and config.tie_word_embeddings or name.endswith("rotary_emb.inv_freq"):
                    continue
                target = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise ExportError(f"{file.name}: tensor {name} has no llama.cpp name; is this a plain Llama model?")
                add_tensor(writer, target, permute_qk(name, f.get_tensor(name).float(), config).numpy(), gguf_type)
    factors = rope_factors(config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)


def add_tensor(writer, name: str, data: np.ndarray, gguf_type: str) -> None:
    """Add one tensor: F32 when 1-D, else gguf_type (q8_0 falls back to F16 when rows do not fill its blocks)."""
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type] if data.ndim > 1 else gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype), raw_dtype=qtype)


def permute_qk(name: str, weights, config):
    """Return q_proj / k_proj weights with each head's rows interleaved as llama.cpp's rotary embedding expects."""
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return llama_permute(weights, config.num_attention_heads)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return llama_permute(weights, config.num_key_value_heads)
    return weights


def llama_permute(weights, n_head: int):
    """Return convert_hf_to_gguf's LlamaModel.permute(weights, n_head, n_head_kv) for this tensor's head count."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def head_dim(config) -> int:
    """Return the per-head dimension (the rotary dimension for Llama)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_factors(config) -> np.ndarray | None:
    """Return Llama 3.1's per-frequency rope scaling factors (llama.cpp's rope_freqs), or None without llama3 scaling."""
    rope = config.rope_parameters or {}
    if rope.get("rope_type") != "llama3":
        return None
    dim, base = head_dim(config), float(rope["rope_theta"])
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def weight_files(model_dir: Path) -> list[Path]:
    """Return the model's safetensors files (the shards an index names, or model.safetensors)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir} has no model*.safetensors; pass a merged or full model folder")
    return files
