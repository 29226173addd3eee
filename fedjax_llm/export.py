"""Exports a run's checkpoint as a Hugging Face model directory, plus a PEFT adapter for LoRA runs.

    python -m fedjax_llm.export RUN_DIR --out DIR [--merged] [--step N]

DIR gets config.json + model.safetensors (LlamaForCausalLM; LoRA folded into the base), the tokenizer
(tokenizer.json, tokenizer_config.json, special_tokens_map.json for AutoTokenizer) and
generation_config.json (stops at EOS). A LoRA run also gets DIR/base (the frozen base, same format)
and DIR/adapter (adapter_config.json + adapter_model.safetensors for peft.PeftModel); --merged skips
those two. Prompts use the training layout: <bos> prompt <sep>, the answer ends with <eos>.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from fedjax_llm.data.tokenizer import BOS, EOS, PAD, SEP, SPECIAL_TOKENS

TOKEN_IDS = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS, "sep_token_id": SEP}
_ROLES = ("pad_token", "bos_token", "eos_token", "sep_token")  # in the order of SPECIAL_TOKENS


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer: Any, out: str | Path) -> list[str]:
    """Our `tokenizers` BPE as tokenizer.json plus the PreTrainedTokenizerFast configs, so that
    `AutoTokenizer.from_pretrained(out)` works offline and encodes to the same ids.

    No model_max_length: RoPE computes any length exactly (training's data.seq_len is in
    fedjax_llm_export.json), and no post-processor: the caller writes <bos> and <sep> itself."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(name) != i:
            raise ValueError(f"export.save_tokenizer: the tokenizer maps {name!r} to "
                             f"{tokenizer.token_to_id(name)}, expected {i}")
    tokenizer.save(str(out / "tokenizer.json"))
    roles = dict(zip(_ROLES, SPECIAL_TOKENS))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **roles, "added_tokens_decoder": added,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False})
    _write_json(out / "special_tokens_map.json", roles)
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _save_model(path: Path, spec: Any, params: Any, tokenizer: Any, base_config: Optional[dict] = None,
                labels: Sequence[str] = ()) -> Path:
    """config.json + safetensors + tokenizer (+ generation_config.json for a causal LM) in one
    directory. A Hugging Face tokenizer (a model imported with model.path) is saved as it is and the
    imported config.json carries the fields we do not model; our BPE gets its own token ids."""
    from fedjax_llm.data.encode import is_hf_tokenizer
    from fedjax_llm.models.hf_io import save_hf

    hf_tok = is_hf_tokenizer(tokenizer)
    save_hf(path, spec, params, base_config=dict(base_config or {}) if hf_tok else dict(TOKEN_IDS))
    if hf_tok:
        tokenizer.save_pretrained(str(path))
    else:
        save_tokenizer(tokenizer, path)
    if labels:  # readable label names instead of LABEL_i
        config = json.loads((path / "config.json").read_text())
        config["id2label"] = {str(i): name for i, name in enumerate(labels)}
        config["label2id"] = {name: i for i, name in enumerate(labels)}
        _write_json(path / "config.json", config)
    elif not hf_tok:
        _write_json(path / "generation_config.json", {
            "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD})
    return path


def export_run(run_dir: str, out: str | Path, *, merged: bool = False,
               step: Optional[int] = None) -> dict:
    """Writes the exports of run_dir's newest checkpoint (or round `step`); returns what was written."""
    from fedjax_llm.runs import load_run

    return export_loaded(load_run(run_dir, step), out, merged=merged)


def export_loaded(run: Any, out: str | Path, *, merged: bool = False) -> dict:
    """export_run for a runs.LoadedRun already in memory."""
    from fedjax_llm.models.hf_io import save_peft_adapter
    from fedjax_llm.models.params import combine

    out = Path(out).absolute()
    cfg = run.cfg
    labels = list(getattr(run, "label_names", []) or [])
    if cfg.data.task == "classify":
        fmt = f"classify prompt + ' ' + response into {cfg.data.label_field} (id2label in config.json)"
    elif cfg.model.family == "hf":
        fmt = "[bos] prompt response [eos] (the imported tokenizer's tokens)"
    else:
        fmt = "<bos> prompt <sep> -> response <eos>"
    base_config = None
    if cfg.model.family == "hf":
        from fedjax_llm.models.build import resolve_path
        base_config = json.loads((Path(resolve_path(cfg.model.path)) / "config.json").read_text())
    written = {"run_dir": os.path.abspath(run.run_dir), "round": run.round,
               "lora": run.spec.lora is not None, "trained_seq_len": cfg.data.seq_len,
               "model": str(out), "prompt_format": fmt}
    _save_model(out, run.spec, combine(run.trainable, run.frozen), run.tokenizer, base_config, labels)
    if run.spec.lora is not None and not merged:
        base_spec = dataclasses.replace(run.spec, lora=None)
        from fedjax_llm.models.build import split_leaves
        head, _ = split_leaves(split_leaves(run.initial, "lora_a")[0], "lora_b")  # a task head, if any:
        base = combine(head, run.frozen) if head else run.frozen  # the adapter's modules_to_save override it
        _save_model(out / "base", base_spec, base, run.tokenizer, base_config, labels)
        save_peft_adapter(out / "adapter", run.spec, run.trainable, str(out / "base"))
        written.update(base=str(out / "base"), adapter=str(out / "adapter"))
    _write_json(out / "fedjax_llm_export.json", written)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script: a user's mistake is one line on stderr (--verbose: with the traceback)."""
    from fedjax_llm.cli import pop_verbose, run_main

    args = list(sys.argv[1:] if argv is None else argv)
    verbose = pop_verbose(args)
    return run_main(lambda: _main(args), "fedjax-llm-export", verbose)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedjax_llm.export",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory (config.yaml, checkpoints/)")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--merged", action="store_true",
                        help="LoRA runs: only the merged model, no base/ and adapter/")
    parser.add_argument("--step", type=int, default=None, help="checkpoint round (default: newest)")
    args = parser.parse_args(argv)
    written = export_run(args.run_dir, args.out, merged=args.merged, step=args.step)
    for key in ("model", "base", "adapter"):
        if key in written:
            print(f"{key}: {written[key]}")
    print(f"round {written['round']} of {args.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
