#!/usr/bin/env python3
"""Cut the small extract committed under tests/data/ out of a full capture (capture_kv.py's output).

Keeps some layers, the first N tokens, every KV head and some query heads, in the same file format;
each header gains "extract": what was kept and from what. Plain Python (no numpy needed).

    python bench/accuracy/make_extract.py --src bench/accuracy/data/smollm2 --dst tests/data/smollm2 \
        --layers 0,3,20,29 --tokens 1024 --query-heads 0,4,8
"""
import argparse
import json
import pathlib
import struct

MAGIC = b"KVQCAP01"


def read(path):
    raw = path.read_bytes()
    if raw[:8] != MAGIC:
        raise SystemExit(f"{path}: not a kvq capture")
    n = struct.unpack("<I", raw[8:12])[0]
    return json.loads(raw[12:12 + n]), raw[12 + n:]


def write(path, header, data):
    text = json.dumps(header, sort_keys=True).encode("utf-8")
    text += b" " * ((-(len(MAGIC) + 4 + len(text))) % 64)
    path.write_bytes(MAGIC + struct.pack("<I", len(text)) + text + data)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--layers", required=True, help="comma-separated layer indices")
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--query-heads", required=True, help="comma-separated query head indices")
    args = ap.parse_args()
    src, dst = pathlib.Path(args.src), pathlib.Path(args.dst)
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.glob("*.kvqcap"):
        old.unlink()
    layers = [int(x) for x in args.layers.split(",")]
    qheads = [int(x) for x in args.query_heads.split(",")]
    total = 0
    for layer in layers:
        files = sorted(src.glob(f"layer{layer:02d}_key_head*.kvqcap")) + \
            sorted(src.glob(f"layer{layer:02d}_value_head*.kvqcap")) + \
            [src / f"layer{layer:02d}_query_head{h}.kvqcap" for h in qheads]
        for f in files:
            header, data = read(f)
            tokens, dim = header["shape"]
            keep = min(tokens, args.tokens)
            header["extract"] = {"of_tokens": tokens, "tokens": keep, "layers": layers, "query_heads": qheads,
                                 "made_by": "bench/accuracy/make_extract.py"}
            header["shape"] = [keep, dim]
            out = data[: keep * dim * 2]
            write(dst / f.name, header, out)
            total += len(out)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["token_ids"] = manifest["token_ids"][: args.tokens]
    manifest["token_strings"] = manifest["token_strings"][: args.tokens]
    manifest["per_layer"] = [e for e in manifest["per_layer"] if e["layer"] in layers]
    manifest["extract"] = {"tokens": args.tokens, "layers": layers, "query_heads": qheads}
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in dst.iterdir())
    print(f"wrote {len(list(dst.glob('*.kvqcap')))} files, {size / 1e6:.2f} MB ({total / 1e6:.2f} MB of fp16 data) to {dst}")


if __name__ == "__main__":
    main()
