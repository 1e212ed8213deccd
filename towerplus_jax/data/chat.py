"""Chat templates as token ids plus a per-token loss mask (1 on assistant content and the end-of-turn token that
closes it, 0 elsewhere), and the Tower+ translation prompt.

  gemma:  <bos><start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n{content}<end_of_turn>\\n
          contents trimmed; a system message is folded into the first user turn as "{system}\\n\\n{user}" (HF
          Gemma 3 template; Gemma 2's rejects system); roles must alternate user/assistant.
  chatml: <|im_start|>{role}\\n{content}<|im_end|>\\n   (Qwen; no bos, no default system prompt)

Each turn is encoded piece by piece (markers as single special tokens, `role\\n` and the content separately), so
the prompt tokens of training rows equal those of a generation prompt.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from towerplus_jax.data import ifmt_rules, languages
from towerplus_jax.data.tokenizers import Tokenizer

TEMPLATES = ("gemma", "chatml")
ROLES = ("system", "user", "assistant")
BOS = "<bos>"
END_OF_TURN = {"gemma": "<end_of_turn>", "chatml": "<|im_end|>"}
START_OF_TURN = {"gemma": "<start_of_turn>", "chatml": "<|im_start|>"}


# The same templates in Hugging Face's Jinja form (tokenizer_config.json "chat_template" of an export).
JINJA = {
    "gemma": (
        "{%- if messages[0]['role'] == 'system' -%}{%- set prefix = messages[0]['content'] + '\n\n' -%}"
        "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set prefix = '' -%}"
        "{%- set loop_messages = messages -%}{%- endif -%}{{ bos_token }}"
        "{%- for message in loop_messages -%}{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
        "{{ '<start_of_turn>' + role + '\n' + ((prefix if loop.first else '') + message['content'] | trim) + "
        "'<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}"
        "{%- endif -%}"),
    "chatml": (
        "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}"
        "{%- endif -%}"),
}


@dataclasses.dataclass(frozen=True)
class Part:
  """A run of the rendered chat: plain text, or one special token (`BOS` = the tokenizer's bos)."""
  text: str
  special: bool = False
  trained: bool = False


def translation_prompt(src_lang_name: str, tgt_lang_name: str, source: str) -> str:
  """The Tower+ translation user turn."""
  return (f"Translate the following {src_lang_name} source text to {tgt_lang_name}:\n"
          f"{src_lang_name}: {source}\n{tgt_lang_name}: ")


def translation_request(record: Mapping) -> str:
  """The Tower+ prompt of a parallel record (languages by `src_lang`/`tgt_lang` names, else named from the
  `src`/`tgt` codes), preceded by its IF-MT rules (if any) as instructions."""
  prompt = translation_prompt(_language(record, "src"), _language(record, "tgt"), record["source"])
  if record.get("rules"):
    prompt = f"{ifmt_rules.describe(record['rules'])}\n{prompt}"
  return prompt


def _language(record: Mapping, side: str) -> str:
  if record.get(f"{side}_lang"):
    return record[f"{side}_lang"]
  if record.get(side):
    return languages.name(record[side])
  raise KeyError(f"{side}_lang")


def to_messages(record: Mapping | Sequence[Mapping]) -> list[dict]:
  """A messages list from `[...]`, `{"messages": [...]}` or `{"prompt", "completion"}` (each a string, i.e. one
  user / assistant turn, or a messages list)."""
  if isinstance(record, Sequence) and not isinstance(record, str):
    return list(record)
  if "messages" in record:
    return list(record["messages"])
  if "prompt" in record and "completion" in record:
    return as_messages(record["prompt"], "user") + as_messages(record["completion"], "assistant")
  raise ValueError(f"need 'messages' or 'prompt'+'completion'; the record has keys {sorted(record)}")


def as_messages(value: str | Sequence[Mapping], role: str) -> list[dict]:
  """A string as one `role` turn; a messages list as is."""
  if isinstance(value, str):
    return [{"role": role, "content": value}]
  if isinstance(value, Sequence):
    return list(value)
  raise TypeError(f"expected a string or a list of messages for the {role} turn, got {type(value).__name__}")


def _checked(messages: Sequence[Mapping]) -> list[tuple[str, str]]:
  if not messages:
    raise ValueError("empty conversation")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise ValueError(f"message {i}: need a dict with 'role' and 'content', got {m!r}")
    if m["role"] not in ROLES:
      raise ValueError(f"message {i}: role {m['role']!r} is not one of {ROLES}")
    if not isinstance(m["content"], str):
      raise ValueError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
    out.append((m["role"], m["content"]))
  return out


def _gemma_parts(turns: list[tuple[str, str]]) -> list[Part]:
  prefix = ""
  if turns[0][0] == "system":
    prefix, turns = turns[0][1] + "\n\n", turns[1:]
  parts = [Part(BOS, special=True)]
  for i, (role, content) in enumerate(turns):
    expected = "user" if i % 2 == 0 else "assistant"
    if role != expected:
      raise ValueError(f"gemma template: turn {i} is {role!r}, expected {expected!r} (roles must alternate "
                       "user/assistant after an optional first system message)")
    trained = role == "assistant"
    parts += [Part(START_OF_TURN["gemma"], special=True), Part("model\n" if trained else "user\n"),
              Part((prefix if i == 0 else "") + content.strip(), trained=trained),
              Part(END_OF_TURN["gemma"], special=True, trained=trained), Part("\n")]
  return parts


def _chatml_parts(turns: list[tuple[str, str]]) -> list[Part]:
  parts = []
  for role, content in turns:
    trained = role == "assistant"
    parts += [Part(START_OF_TURN["chatml"], special=True), Part(role + "\n"), Part(content, trained=trained),
              Part(END_OF_TURN["chatml"], special=True, trained=trained), Part("\n")]
  return parts


def chat_parts(template: str, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> list[Part]:
  """The template's runs of text and special tokens for `messages`."""
  if template not in TEMPLATES:
    raise ValueError(f"unknown chat template {template!r}; use one of {TEMPLATES}")
  turns = _checked(messages)
  parts = _gemma_parts(turns) if template == "gemma" else _chatml_parts(turns)
  if add_generation_prompt:
    parts += [Part(START_OF_TURN[template], special=True), Part("model\n" if template == "gemma" else "assistant\n")]
  return parts


def encode_chat(tokenizer: Tokenizer, template: str, messages: Sequence[Mapping] | Mapping,
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """Token ids of the chat and a loss mask of the same length (1 on assistant content + its end-of-turn)."""
  ids: list[int] = []
  mask: list[int] = []
  for part in chat_parts(template, to_messages(messages), add_generation_prompt):
    if part.special:
      piece_ids = [_special_id(tokenizer, template, part.text)]
    else:
      piece_ids = tokenizer.encode(part.text) if part.text else []
    ids += piece_ids
    mask += [int(part.trained)] * len(piece_ids)
  return ids, mask


def _special_id(tokenizer: Tokenizer, template: str, piece: str) -> int:
  if piece == BOS:
    if tokenizer.bos_id is None:
      raise ValueError(f"the {template} chat template needs a tokenizer with a bos token")
    return tokenizer.bos_id
  try:
    return tokenizer.token_id(piece)
  except KeyError:
    raise ValueError(f"the {template} chat template needs the token {piece!r}, which the tokenizer lacks") from None


def family_template(family: str) -> str:
  """The chat template a model family ships with: gemma for Gemma, chatml for Qwen."""
  return "gemma" if family.startswith("gemma") else "chatml"


def stop_ids(tokenizer: Tokenizer, template: str) -> list[int]:
  """Ids that end an assistant turn: the template's end-of-turn token and eos."""
  if template not in TEMPLATES:
    raise ValueError(f"unknown chat template {template!r}; use one of {TEMPLATES}")
  return list(dict.fromkeys([tokenizer.token_id(END_OF_TURN[template]), tokenizer.eos_id]))
