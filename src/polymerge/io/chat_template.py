"""The recipe's ``chat_template``: ``auto`` (the template most input models share), a template
name (``chatml``, ``llama3``, ``mistral``, ``alpaca``, ``exaone``: the names mergekit 0.1.5
knows, each written here from the format it names), or an inline Jinja template; written into
the output's tokenizer config.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from polymerge.errors import CheckpointError, RecipeError
from polymerge.io.checkpoint import contained_file, read_json_file

TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"),
    "exaone": (
        "{% for message in messages %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] != 'user' %}{{ '[|endofturn|]' }}{% endif %}{{ '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"),
}
CONFIG_NAME = "tokenizer_config.json"
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def check_chat_template(value: str) -> str:
    """``auto``, a known name, or inline Jinja (at least 20 characters with a ``{``), as
    mergekit accepts; anything else is a one-line error naming the choices."""
    if value == "auto" or value in TEMPLATES:
        return value
    if len(value) < 20 or "{" not in value:
        raise RecipeError(f"chat_template {value[:40]!r} is neither auto, a template name "
                          f"({', '.join(sorted(TEMPLATES))}) nor a Jinja template")
    return value


def model_template(folder: Path) -> str | None:
    """A model folder's chat template (``chat_template.jinja``, else the tokenizer config's
    ``chat_template``: a string, or the ``default`` of a list of named templates)."""
    if not folder.is_dir():
        return None
    if os.path.lexists(folder / "chat_template.jinja"):
        path = contained_file(folder, "chat_template.jinja", "chat template")
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read the chat template ({exc})") from None
    if not os.path.lexists(folder / CONFIG_NAME):
        return None
    config = read_json_file(contained_file(folder, CONFIG_NAME, "tokenizer config"),
                            CONFIG_NAME)
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def resolve_chat_template(choice: str | None, model_folders: Iterable[Path]) -> str | None:
    """The template text a recipe's ``chat_template`` asks for; ``auto`` picks the template
    most of the input models have (the first such on a tie), None when none has one."""
    if not choice:
        return None
    check_chat_template(choice)
    if choice == "auto":
        found = [t.strip() for t in (model_template(f) for f in model_folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return TEMPLATES.get(choice, choice)


def write_chat_template(folder: Path, template: str) -> bool:
    """Set ``template`` as the chat template of the tokenizer saved in ``folder`` (its
    tokenizer config; a template file copied from an input is removed so that it cannot
    override it). False when the folder has no tokenizer config to put it in."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        return False
    config: Any = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        return False
    config["chat_template"] = template
    for name in TEMPLATE_FILES:
        (folder / name).unlink(missing_ok=True)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    return True
