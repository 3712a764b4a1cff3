"""Run an exported GGUF in llama.cpp (llama-cpp-python) and, given the model folder it came from, compare with transformers.

    python scripts/llamacpp_check.py MODEL.gguf [--reference MERGED_DIR] [--prompt TEXT] [--max-tokens 40]
        [--llama-site /tmp/llvenv/lib/python3.11/site-packages] [--no-repack]

llama-cpp-python is not a peftkit dependency (it compiles llama.cpp; about 3 minutes on 2 cores). Install
it into a throwaway venv (python -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install llama-cpp-python) and
run this script with peftkit's python, pointing --llama-site at that venv's site-packages: llama_cpp is then
imported from there while torch and transformers come from peftkit's venv.

It prints what llama.cpp reads from the file (pre-tokenizer, chat template, end-of-turn token), the reply
of llama.cpp's own chat completion (which renders the chat template stored in the GGUF), and with
--reference: whether llama.cpp tokenizes the rendered prompt into the same ids as the model folder's
tokenizer, the largest difference of its next-token logits from transformers', and both greedy replies.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    args = parse_args()
    if args.llama_site:
        sys.path.append(args.llama_site)  # after this venv's packages: numpy etc. stay peftkit's
    from llama_cpp import Llama

    if args.no_repack:
        disable_weight_repacking()
    llm = Llama(model_path=str(args.gguf), n_ctx=1024, logits_all=True, seed=0, verbose=False)
    meta = llm.metadata
    print(f"llama.cpp read {args.gguf.name}: arch {meta.get('general.architecture')}, "
          f"pre-tokenizer {meta.get('tokenizer.ggml.pre')}, eot id {meta.get('tokenizer.ggml.eot_token_id')}, "
          f"chat template {len(meta.get('tokenizer.chat_template', ''))} chars, {llm.n_vocab()} tokens")
    system = system_prompt(args.reference)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": args.prompt}]
    chat = llm.create_chat_completion(messages=messages, max_tokens=args.max_tokens, temperature=0.0)
    print(f"llama.cpp chat completion: {chat['choices'][0]['message']['content']!r}")
    if args.reference:
        compare(llm, args.reference, messages, args.max_tokens)
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--reference", type=Path, help="the merged/full model folder the GGUF was written from")
    p.add_argument("--prompt", default="Can I return a jacket that does not fit?")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--llama-site", help="site-packages folder holding llama_cpp (a separate venv)")
    p.add_argument("--no-repack", action="store_true",
                   help="keep quantized weights as stored (llama.cpp's use_extra_bufts off): its CPU repacking of Q8_0/Q4 "
                        "weights crashed on the AMX machine docs/merge.md was written on, for any quantized file")
    return p.parse_args()


def disable_weight_repacking() -> None:
    import llama_cpp.llama_cpp as api

    defaults = api.llama_model_default_params

    def params():
        value = defaults()
        value.use_extra_bufts = False
        return value

    api.llama_model_default_params = params


def system_prompt(reference: Path | None) -> str | None:
    if reference is None:
        return None
    from peftkit.prompting import read_prompting

    return read_prompting(reference).system_prompt


def compare(llm, reference: Path, messages: list[dict], max_tokens: int) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.prompting import read_prompting, stop_ids

    tokenizer = AutoTokenizer.from_pretrained(reference)
    prompting = read_prompting(reference)
    text = tokenizer.apply_chat_template(messages, chat_template=prompting.chat_template, tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    llama_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    print(f"prompt tokens: transformers {len(ids)}, llama.cpp {len(llama_ids)}, identical: {ids == llama_ids}")
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    with torch.inference_mode():
        hf = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    llm.reset()
    llm.eval(ids)
    cpp = np.asarray(llm.scores[len(ids) - 1])
    diff = float(np.abs(hf - cpp).max())
    print(f"next-token logits: max |difference| {diff:.4g} = {diff / float(np.abs(hf).max()):.3g} of the logit scale; "
          f"argmax transformers {int(hf.argmax())} llama.cpp {int(cpp.argmax())}")
    stops = stop_ids(tokenizer, prompting)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops)
    hf_reply = tokenizer.decode([t for t in out[0, len(ids):].tolist() if t not in stops], skip_special_tokens=True)
    llm.reset()
    cpp_reply = llm.create_completion(prompt=ids, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"]
    print(f"greedy reply, transformers: {hf_reply.strip()!r}")
    print(f"greedy reply, llama.cpp:    {cpp_reply.strip()!r}")


if __name__ == "__main__":
    sys.exit(main())
