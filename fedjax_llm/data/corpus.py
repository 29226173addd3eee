"""Loads prompt/response examples from the chatterbot corpus or from a JSONL file.

JSONL format (`data.source=jsonl`, `data.path=FILE`), one JSON object per line, blank lines ignored:
  {"prompt": str, "response": str, ...}   a dialogue pair; the loss covers the response only
  {"text": str, ...}                      a plain document; prompt "" so the loss covers all of it
Optional fields go to `Example.meta` as strings: "client" (natural partition, `partition.client_field`),
"cloud" (`partition.cloud_field`), "label" (Dirichlet, `partition.label_field`) and any other scalar
field (numbers and booleans as JSON text); null, lists and objects are ignored.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Mapping, Sequence

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    meta: Mapping[str, str]


def chatterbot_root() -> str:
    """The installed package's data folder, chatterbot_corpus/data/<language>/<category>.yml."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("data.source=chatterbot needs the chatterbot-corpus package (pip install chatterbot-corpus)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def chatterbot_catalog() -> dict[str, list[str]]:
    """language -> sorted category names (file stems) available in the installed corpus."""
    root = chatterbot_root()
    return {lang: sorted(f[:-4] for f in os.listdir(os.path.join(root, lang)) if f.endswith(".yml"))
            for lang in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, lang))}


def _select(wanted: Sequence[str], valid: Sequence[str], key: str) -> list[str]:
    unknown = [w for w in wanted if w not in valid]
    if unknown:
        raise ValueError(f"{key}: unknown {unknown}; valid values: {sorted(valid)}")
    return sorted(set(wanted)) if wanted else sorted(valid)


def conversation_pairs(conversation: object) -> list[tuple[str, str]]:
    """[t0, t1, t2, ...] -> [(t0, t1), (t1, t2), ...]; pairs with a non-string or blank turn are skipped."""
    if not isinstance(conversation, list):
        return []
    ok = [isinstance(t, str) and bool(t.strip()) for t in conversation]
    return [(conversation[i], conversation[i + 1])
            for i in range(len(conversation) - 1) if ok[i] and ok[i + 1]]


def load_chatterbot(languages: Sequence[str] = (), categories: Sequence[str] = ()) -> list[Example]:
    """Every consecutive turn pair of every selected conversation; empty selection = all of them."""
    catalog = chatterbot_catalog()
    langs = _select(languages, list(catalog), "data.languages")
    available = sorted({c for lang in langs for c in catalog[lang]})
    cats = set(_select(categories, available, "data.categories"))
    root = chatterbot_root()
    examples = []
    for lang in langs:
        for cat in catalog[lang]:
            if cat not in cats:
                continue
            path = os.path.join(root, lang, cat + ".yml")
            with open(path, encoding="utf-8") as f:
                doc = yaml.load(f, Loader=_Loader)
            convs = doc.get("conversations") if isinstance(doc, dict) else None
            meta = {"language": lang, "category": cat, "source": f"{lang}/{cat}"}
            for conv in convs or []:
                examples.extend(Example(p, r, meta) for p, r in conversation_pairs(conv))
    return examples


def _meta_value(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return None


def _parse_record(obj: object, where: str) -> Example:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    has_pair = "prompt" in obj or "response" in obj
    if "text" in obj and has_pair:
        raise ValueError(f"{where}: give either 'text' or 'prompt'+'response', not both")
    if "text" in obj:
        fields = {"prompt": "", "response": obj["text"]}
        names = {"response": "text"}
    elif has_pair:
        missing = [k for k in ("prompt", "response") if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing field {missing[0]!r} (records need 'prompt' and 'response', or 'text')")
        fields = {"prompt": obj["prompt"], "response": obj["response"]}
        names = {}
    else:
        raise ValueError(f"{where}: missing field: records need 'prompt' and 'response', or 'text'")
    for k, v in fields.items():
        if not isinstance(v, str):
            raise ValueError(f"{where}: field {names.get(k, k)!r} must be a string, got {type(v).__name__}")
    meta = {}
    for k, v in obj.items():
        if k not in ("prompt", "response", "text"):
            s = _meta_value(v)
            if s is not None:
                meta[k] = s
    return Example(fields["prompt"], fields["response"], meta)


def load_jsonl(path: str) -> list[Example]:
    """Reads one example per non-blank line; errors name the file and line (format in the module docstring)."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"data.path: no such file {full!r}")
    examples = []
    with open(full, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{full}:{lineno}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 ({e})") from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON ({e})") from None
            examples.append(_parse_record(obj, where))
    if not examples:
        raise ValueError(f"data.path: {full!r} has no records")
    return examples
