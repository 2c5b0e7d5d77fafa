"""Conversation templates as Jinja chat templates, saved inside every checkpoint.

The prompt format is data stored with the model (``chat_template.jinja`` via the processor and
the tokenizer), never chosen from a model's name. Messages use the transformers layout
``{"role": "user"|"assistant"|"system", "content": str | [{"type": "image"}, {"type": "text", ...}]}``;
an image part renders as ``<image>``.

- ``v1``: LLaVA-Med v1 (the original "SINGLE" separator style): the system text, then
  ``###Human: …###Assistant: …###`` turns; generation stops at ``###``.
- ``v1.5``: LLaVA-Med v1.5 on Mistral-Instruct: ``<s>[INST] <image>\n… [/INST] …</s>``.
- ``tiny``: the v1.5 layout without a system prompt, kept short for the tiny model.
"""

from __future__ import annotations

__all__ = ["TEMPLATES", "STOP_STRINGS", "V1_SYSTEM", "render_messages", "template_name_of"]

V1_SYSTEM = ("You are LLaVA-Med, a large language and vision assistant trained by a group of "
             "researchers at Microsoft, based on the general domain LLaVA architecture. You are able "
             "to understand the visual content that the user provides, and assist the user with a "
             "variety of medical and clinical research tasks using natural language. Follow the "
             "instructions carefully and explain your answers in detail.")

# Shared macro: content may be a string or a list of parts; an image part renders as "<image>\n".
_CONTENT = (
    "{%- macro content(m) -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

# LLaVA-Med v1 "SINGLE" separator style: <s>SYSTEM###Human: Q###Assistant: A###Human: ...
# (the original LLaMA tokenizer added BOS itself; prompts here are tokenized without specials).
_V1 = (
    _CONTENT
    + "{%- if messages and messages[0]['role'] == 'system' -%}{%- set sys = content(messages[0]) -%}"
    "{%- set msgs = messages[1:] -%}{%- else -%}{%- set sys = '" + V1_SYSTEM + "' -%}"
    "{%- set msgs = messages -%}{%- endif -%}"
    "{{ bos_token + sys + '###' }}"
    "{%- for m in msgs -%}"
    "{%- if m['role'] == 'user' -%}{{ 'Human: ' + content(m) + '###' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ 'Assistant: ' }}"
    "{%- generation -%}{{ content(m) + '###' }}{%- endgeneration -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

# Mistral-Instruct style (LLaVA-Med v1.5): <s>[INST] <image>\nQ [/INST] A</s>[INST] Q2 [/INST]
_INST = (
    _CONTENT
    + "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ content(m) + '\n' }}"
    "{%- elif m['role'] == 'user' -%}{{ '[INST] ' + content(m) + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' }}"
    "{%- generation -%}{{ content(m) + eos_token }}{%- endgeneration -%}"
    "{%- endif -%}{%- endfor -%}"
)

TEMPLATES: dict[str, str] = {"v1": _V1, "v1.5": _INST, "tiny": _INST}
"""Template name → Jinja source."""

STOP_STRINGS: dict[str, list[str]] = {"v1": ["###"], "v1.5": [], "tiny": []}
"""Extra stop strings per template (EOS always stops)."""


def template_name_of(chat_template: str | None) -> str | None:
    """The name of a known template given its source, or ``None`` for a custom one."""
    for name, src in TEMPLATES.items():
        if chat_template == src:
            return name
    return None


def render_messages(template: str, messages: list[dict], add_generation_prompt: bool,
                    bos_token: str = "<s>", eos_token: str = "</s>") -> str:
    """Render messages with a template's Jinja source (without a tokenizer).

    Args:
        template: Jinja source (one of :data:`TEMPLATES` or a checkpoint's own).
        messages: transformers-style chat messages.
        add_generation_prompt: end with the assistant's prefix.
        bos_token: the tokenizer's BOS string.
        eos_token: the tokenizer's EOS string.

    Returns:
        The prompt text, with ``<image>`` where images go.
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.ext import Extension
    from jinja2 import nodes

    class _Generation(Extension):
        # transformers' {% generation %} marks assistant tokens; rendering ignores it.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation])
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token, eos_token=eos_token)
