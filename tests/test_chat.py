"""Chat templates: ids and loss masks hand-checked on a character tokenizer; rendered text and token ids against
transformers' `apply_chat_template` with the public Gemma / ChatML jinja templates."""
import shutil

import pytest

from towerplus_jax.data import chat, tokenizers

SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 3, "<end_of_turn>": 4, "<|im_start|>": 5,
            "<|im_end|>": 6}
OFFSET = 10

# google/gemma-2-it (system rejected) and google/gemma-3-it (system folded into the first user turn), text-only.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}")
# Qwen2.5-Instruct without tools, when the conversation has its own system message (else Qwen adds a default one).
CHATML_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": " Translate: ok \n"},
                {"role": "assistant", "content": "Certo."},
                {"role": "user", "content": "Again"},
                {"role": "assistant", "content": " Outra vez\n"}]


class CharTokenizer:
  """One token per character (id = OFFSET + code point) plus the specials above; no merges at all."""
  vocab_size = OFFSET + 0x110000
  bos_id, eos_id, pad_id = 2, 1, 0

  def encode(self, text):
    return [OFFSET + ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i - OFFSET) for i in ids if i >= OFFSET)

  def token_id(self, piece):
    if piece not in SPECIALS:
      raise KeyError(piece)
    return SPECIALS[piece]


def render(template, messages, add_generation_prompt=False) -> str:
  """The chat as text (what HF `apply_chat_template(..., tokenize=False)` renders)."""
  return "".join(p.text for p in chat.chat_parts(template, messages, add_generation_prompt))


def chars(text):
  return [OFFSET + ord(c) for c in text]


def test_gemma_ids_and_mask_by_hand():
  tok = CharTokenizer()
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
  ids, mask = chat.encode_chat(tok, "gemma", messages)
  sot, eot = SPECIALS["<start_of_turn>"], SPECIALS["<end_of_turn>"]
  want = ([2, sot] + chars("user\nhi") + [eot] + chars("\n") + [sot] + chars("model\nok") + [eot] + chars("\n"))
  assert ids == want
  n_user = 2 + len("user\nhi") + 1 + 1 + 1 + len("model\n")
  assert mask == [0] * n_user + [1, 1, 1] + [0]
  gen_ids, gen_mask = chat.encode_chat(tok, "gemma", messages[:1], add_generation_prompt=True)
  assert gen_ids == want[:n_user] and gen_mask == [0] * n_user


def test_chatml_ids_and_mask_by_hand():
  tok = CharTokenizer()
  ids, mask = chat.encode_chat(tok, "chatml", {"prompt": "hi", "completion": "ok"})
  start, end = SPECIALS["<|im_start|>"], SPECIALS["<|im_end|>"]
  want = [start] + chars("user\nhi") + [end] + chars("\n") + [start] + chars("assistant\nok") + [end] + chars("\n")
  assert ids == want
  n_prompt = 1 + len("user\nhi") + 1 + 1 + 1 + len("assistant\n")
  assert mask == [0] * n_prompt + [1, 1, 1, 0]


def test_multi_turn_mask_covers_every_assistant_turn():
  tok = CharTokenizer()
  for template, eot in (("gemma", SPECIALS["<end_of_turn>"]), ("chatml", SPECIALS["<|im_end|>"])):
    ids, mask = chat.encode_chat(tok, template, CONVERSATION)
    trained = [i for i, m in zip(ids, mask) if m]
    strip = template == "gemma"
    want = [c for m in CONVERSATION if m["role"] == "assistant"
            for c in chars(m["content"].strip() if strip else m["content"]) + [eot]]
    assert trained == want


def test_prompt_completion_equals_messages():
  tok = CharTokenizer()
  record = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "completion": "A"}
  messages = record["prompt"] + [{"role": "assistant", "content": "A"}]
  assert chat.encode_chat(tok, "gemma", record) == chat.encode_chat(tok, "gemma", {"messages": messages})


def test_translation_prompt_matches_model_card():
  want = ("Translate the following English source text to Portuguese (Portugal):\n"
          "English: Hello world!\nPortuguese (Portugal): ")
  assert chat.translation_prompt("English", "Portuguese (Portugal)", "Hello world!") == want


def test_stop_ids():
  tok = CharTokenizer()
  assert chat.stop_ids(tok, "gemma") == [SPECIALS["<end_of_turn>"], tok.eos_id]
  assert chat.stop_ids(tok, "chatml") == [SPECIALS["<|im_end|>"], tok.eos_id]


@pytest.mark.parametrize("messages, error", [
    ([{"role": "assistant", "content": "x"}], "alternate"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "alternate"),
    ([{"role": "robot", "content": "x"}], "robot"),
    ([{"role": "user"}], "message 0"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ([], "empty"),
])
def test_bad_conversations(messages, error):
  with pytest.raises(ValueError, match=error):
    chat.encode_chat(CharTokenizer(), "gemma", messages)


def test_unknown_template():
  with pytest.raises(ValueError, match="unknown chat template"):
    chat.encode_chat(CharTokenizer(), "llama", [{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def hf_gemma(tmp_path_factory):
  """transformers' Gemma tokenizer converted from a SentencePiece model with the chat markers."""
  transformers = pytest.importorskip("transformers")
  folder = tmp_path_factory.mktemp("gemma")
  texts = [m["content"] for m in CONVERSATION] * 20 + ["Translate the following text to Portuguese"] * 20
  path = tokenizers.train_sentencepiece(texts, str(folder / "sp"), 300, (*tokenizers.CHAT_SYMBOLS, "\n"))
  shutil.copy(path, folder / "tokenizer.model")
  return transformers.GemmaTokenizer.from_pretrained(str(folder)), tokenizers.SentencePieceTokenizer(path)


@pytest.mark.parametrize("template, jinja, messages", [
    pytest.param("gemma", GEMMA2_TEMPLATE, CONVERSATION[1:], id="gemma2"),
    pytest.param("gemma", GEMMA3_TEMPLATE, CONVERSATION, id="gemma3-system"),
    pytest.param("gemma", GEMMA3_TEMPLATE, CONVERSATION[:2], id="gemma3-system-only-user"),
    pytest.param("chatml", CHATML_TEMPLATE, CONVERSATION, id="chatml"),
])
@pytest.mark.parametrize("generation", [False, True])
def test_matches_transformers_chat_template(hf_gemma, template, jinja, messages, generation):
  ref, tok = hf_gemma
  if generation and messages[-1]["role"] == "assistant":
    messages = messages[:-1]
  text = ref.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=generation)
  assert render(template, messages, generation) == text
  ids, _ = chat.encode_chat(tok, template, messages, generation)
  assert ids == ref.encode(text, add_special_tokens=False)


def test_tokenizer_without_the_template_markers():
  class NoMarkers(CharTokenizer):
    bos_id = None

    def token_id(self, piece):
      raise KeyError(piece)

  with pytest.raises(ValueError, match=r"needs the token '<\|im_start\|>'"):
    chat.encode_chat(NoMarkers(), "chatml", [{"role": "user", "content": "x"}])
  with pytest.raises(ValueError, match="needs a tokenizer with a bos token"):
    chat.encode_chat(NoMarkers(), "gemma", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template", chat.TEMPLATES)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_jinja_template_renders_the_same_text(template, generation_prompt):
  """The Jinja template an export ships renders what training saw (transformers' sandboxed Jinja environment)."""
  from jinja2.sandbox import ImmutableSandboxedEnvironment
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there \n"},
              {"role": "assistant", "content": "Hello!\n"}, {"role": "user", "content": "Translate: gato"}]
  if template == "chatml":
    messages[1]["content"] = messages[1]["content"].strip()
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  text = env.from_string(chat.JINJA[template]).render(messages=messages, add_generation_prompt=generation_prompt,
                                                      bos_token=chat.BOS)
  assert text == render(template, messages, generation_prompt)
