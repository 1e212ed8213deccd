"""IF-MT rule checks: a satisfied and a violated case per rule type, errors, adherence fractions."""
import pytest

from towerplus_jax.data.ifmt_rules import check_rule, count_words, rule_adherence

CASES = [  # (rule, output, source, expected)
    ({"type": "include", "terms": ["Tower", "modelo"]}, "O modelo Tower traduz.", "", True),
    ({"type": "include", "terms": ["Tower", "modelo"]}, "O Tower traduz.", "", False),
    ({"type": "include", "terms": ["tower"]}, "TOWER traduz.", "", True),  # case-insensitive
    ({"type": "include", "terms": ["公司"]}, "Tower公司很好", "", True),  # CJK: no word boundary needed
    ({"type": "exclude", "terms": ["cat"]}, "A category of its own.", "", True),  # whole words only
    ({"type": "exclude", "terms": ["cat", "dog"]}, "The dog sleeps.", "", False),
    ({"type": "glossary", "source_term": "bank", "target_term": "banco"}, "Fui ao banco.", "I went to the bank.", True),
    ({"type": "glossary", "source_term": "bank", "target_term": "banco"}, "Fui à margem.", "I went to the bank.", False),
    ({"type": "glossary", "source_term": "bank", "target_term": "banco"}, "Olá.", "Hello.", True),  # not in source
    ({"type": "glossary", "source_term": "cloud", "target_term": "云"}, "数据存储在云端。", "It is in the cloud.", True),
    ({"type": "max_words", "value": 3}, "Um dois três.", "", True),
    ({"type": "max_words", "value": 3}, "Um dois três quatro.", "", False),
    ({"type": "max_words", "value": 4}, "我爱你们", "", True),  # one word per Han character
    ({"type": "max_words", "value": 3}, "我爱你们", "", False),
    ({"type": "min_words", "value": 2}, "Olá — mundo", "", True),  # the dash is not a word
    ({"type": "min_words", "value": 3}, "Olá — mundo", "", False),
    ({"type": "date_format", "format": "DD/MM/YYYY"}, "Le 05/03/2024.", "On March 5, 2024.", True),
    ({"type": "date_format", "format": "DD/MM/YYYY"}, "Le 2024-03-05.", "On March 5, 2024.", False),  # wrong format
    ({"type": "date_format", "format": "DD/MM/YYYY"}, "Le 03/05/2024.", "On March 5, 2024.", False),  # day/month swap
    ({"type": "date_format", "format": "DD/MM/YYYY"}, "Le 5 mars 2024.", "On March 5, 2024.", False),  # date not kept
    ({"type": "date_format", "format": "DD/MM/YYYY"}, "Le 31/02/2024.", "", False),  # no such date
    ({"type": "date_format", "format": "MM/DD/YYYY"}, "On 03/05/2024.", "Le 5 March 2024.", True),
    ({"type": "date_format", "format": "MM/DD/YYYY"}, "On 13/05/2024.", "", False),  # month 13
    ({"type": "date_format", "format": "YYYY-MM-DD"}, "Am 2024-03-05 und 2024-12-31.", "5/3/2024 and 31/12/2024", True),
    ({"type": "date_format", "format": "DD.MM.YYYY"}, "Am 05.03.2024.", "on 2024-03-05", True),
    ({"type": "date_format", "format": "DD.MM.YYYY"}, "Am 5.3.2024.", "on 2024-03-05", False),  # not zero-padded
    ({"type": "date_format", "format": "YYYY年MM月DD日"}, "会议在2024年03月05日举行。", "On 03/05/2024.", True),
    ({"type": "date_format", "format": "YYYY年MM月DD日"}, "会议在2024年3月5日举行。", "On 03/05/2024.", False),
    ({"type": "number_format", "decimal": ","}, "Custa 1.234,50 euros e pesa 3,5 kg.", "", True),
    ({"type": "number_format", "decimal": ","}, "Custa 1,234.50 euros.", "", False),
    ({"type": "number_format", "decimal": ","}, "Pesa 3.14 kg em 05.03.2024.", "", False),
    ({"type": "number_format", "decimal": "."}, "It costs 1,234.50 and weighs 3.5 kg on 05.03.2024.", "", True),
    ({"type": "number_format", "decimal": "."}, "It weighs 3,14 kg.", "", False),
    ({"type": "language", "lang": "zh"}, "我们今天去公园散步。", "", True),
    ({"type": "language", "lang": "zh"}, "今日は公園を散歩します。", "", False),  # kana: Japanese
    ({"type": "language", "lang": "ja"}, "今日は公園を散歩します。", "", True),
    ({"type": "language", "lang": "ja"}, "我们今天去公园散步。", "", False),
    ({"type": "language", "lang": "ko"}, "오늘 공원에 갑니다.", "", True),
    ({"type": "language", "lang": "ko"}, "We go to the park.", "", False),
    ({"type": "language", "lang": "ru"}, "Мы идём в парк, и это хорошо.", "", True),
    ({"type": "language", "lang": "ru"}, "We go to the park.", "", False),
    ({"type": "language", "lang": "pt_BR"}, "O gato está em cima da mesa e não dorme.", "", True),
    ({"type": "language", "lang": "de"}, "The cat is on the table and it is asleep.", "", False),  # English stop words
    ({"type": "language", "lang": "de-DE"}, "Die Katze ist auf dem Tisch und schläft nicht.", "", True),
    ({"type": "language", "lang": "en"}, "Die Katze ist auf dem Tisch und schläft nicht.", "", False),
    ({"type": "json"}, '{"text": "Olá", "n": [1, 2]}', "", True),
    ({"type": "json"}, "{'text': 'Olá'}", "", False),
    ({"type": "no_extra_text"}, "Olá, mundo!", "Hello, world!", True),
    ({"type": "no_extra_text"}, "Here is the translation: Olá, mundo!", "Hello, world!", False),
    ({"type": "no_extra_text"}, "Sure! The Portuguese translation is below.\nOlá, mundo!", "", False),
    ({"type": "no_extra_text"}, "Translation: Olá, mundo!", "Hello, world!", False),
    ({"type": "no_extra_text"}, "Olá, mundo!\nNote: informal register.", "Hello, world!", False),
    ({"type": "no_extra_text"}, "Olá.\nTudo bem?", "Hello.\nHow are you?", True),  # as many lines as the source
    ({"type": "no_extra_text"}, "Olá.\nTudo bem?", "Hello. How are you?", False),
]


@pytest.mark.parametrize("rule,output,source,expected", CASES)
def test_rule_cases(rule, output, source, expected):
  assert check_rule(rule, output, source) is expected


def test_every_rule_type_has_true_and_false_case():
  seen = {(rule["type"], expected) for rule, _, _, expected in CASES}
  types = {rule["type"] for rule, *_ in CASES}
  assert types == {"include", "exclude", "glossary", "max_words", "min_words", "date_format", "number_format",
                   "language", "json", "no_extra_text"}
  assert seen == {(t, e) for t in types for e in (True, False)}


def test_count_words():
  assert count_words("Hello, big  world !") == 3
  assert count_words("我爱 Tower 模型") == 5


def test_rule_adherence_fraction():
  rules = [{"type": "include", "terms": ["banco"]}, {"type": "max_words", "value": 2},
           {"type": "json"}, {"type": "exclude", "terms": ["margem"]}]
  assert rule_adherence(rules, "Fui ao banco.") == 2 / 4
  assert rule_adherence([], "anything") == 1.0


def test_bad_rules_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown rule type 'rhyme'"):
    check_rule({"type": "rhyme"}, "x")
  with pytest.raises(ValueError, match=r"misses key\(s\) \['target_term'\]"):
    check_rule({"type": "glossary", "source_term": "a"}, "x", "a")
  with pytest.raises(ValueError, match="'type'"):
    check_rule({"terms": ["a"]}, "x")
  with pytest.raises(ValueError, match="list of non-empty strings"):
    check_rule({"type": "include", "terms": "banco"}, "banco")
  with pytest.raises(ValueError, match="unknown language 'xx'"):
    check_rule({"type": "language", "lang": "xx"}, "x")
  with pytest.raises(ValueError, match="decimal must be"):
    check_rule({"type": "number_format", "decimal": ";"}, "1;5")
  with pytest.raises(ValueError, match="needs one year"):
    check_rule({"type": "date_format", "format": "DD/MM"}, "05/03")
  with pytest.raises(ValueError, match="list of rule dicts"):
    rule_adherence({"type": "json"}, "{}")
