"""An Ollama Modelfile beside an exported GGUF: the file, the chat template, the system prompt and the stop tokens.

Ollama's TEMPLATE is a Go template, not Jinja, so it cannot be copied from the tokenizer. A chat template
is taken to be ChatML when it renders a probe conversation exactly as ChatML would; then the Go template
below (the shape of Ollama's own ChatML templates) renders the same text. Other templates get a comment
saying why no TEMPLATE line is written. The SYSTEM line is the system prompt training used, or the
default one a template inserts by itself (SmolLM2's does), since Ollama only sends one it is given.
"""
from __future__ import annotations

from pathlib import Path

from peftkit.atomic import write_text
from peftkit.prompting import Prompting

OLLAMA_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""
PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
         {"role": "user", "content": "V"}]
CHATML = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
          "<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n")


def write_modelfile(gguf_path: Path, tokenizer, prompting: Prompting, stop_tokens: list[str]) -> Path:
    """Write an Ollama Modelfile beside gguf_path and return its path."""
    template = prompting.chat_template or tokenizer.chat_template
    lines = [f"# Written by peftkit export gguf. Create the model with: ollama create NAME -f {gguf_path.parent / 'Modelfile'}",
             f"FROM ./{gguf_path.name}"]
    if template and is_chatml(tokenizer, template):
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
        system = prompting.system_prompt or default_system(tokenizer, template)
    else:
        lines += ["# No TEMPLATE: the training chat template is not ChatML-style, and peftkit does not translate other Jinja",
                  "# templates into Ollama's Go templates. The GGUF holds it (tokenizer.chat_template); Ollama uses a",
                  "# built-in template when it recognises that one. Check with `ollama show --template NAME`."]
        system = prompting.system_prompt
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    path = gguf_path.parent / "Modelfile"
    write_text(path, "\n".join(lines) + "\n")
    return path


def is_chatml(tokenizer, template: str) -> bool:
    """Return True when the template renders the probe conversation exactly as ChatML does."""
    try:
        text = tokenizer.apply_chat_template(PROBE, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that refuses the probe is not ChatML
        return False
    return text == CHATML


def default_system(tokenizer, template: str) -> str | None:
    """Return the system prompt a ChatML template inserts when the conversation has none, else None."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "U"}], chat_template=template, tokenize=False)
    head = "<|im_start|>system\n"
    if not text.startswith(head):
        return None
    return text[len(head):].split("<|im_end|>", 1)[0] or None
