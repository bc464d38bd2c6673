#!/usr/bin/env python3
"""End to end: what int8 K/V caches cost SmolLM2-135M-Instruct's next-token predictions on the text.

Runs the same input as capture_kv.py (chat template + bench/accuracy/text.txt, 3307 tokens) with every
attention layer reading a quantized-then-dequantized K and/or V, and reports perplexity, the mean KL
divergence of the next-token distribution from the unquantized model, and how often the top-1 token
changes. The quantization is a torch re-implementation of kvq's numeric contract (symmetric int8,
scale = amax / 127 in fp32 per group, round half to even, clamp to [-127, 127], dequantize to fp16):
kvq itself is C++/CUDA, and the per-layer numbers in bench/results/accuracy.md come from kvq's own
reference. Every query reads the quantized cache, as in decoding (the query's own K/V included);
one scale set per KV head, as in kvq_accuracy.

    python bench/accuracy/perplexity_kv.py --threads 2     # ~1 min per configuration on 2 cores
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import capture_kv  # noqa: E402

# id -> (granularity, group); groups count channels for per-token, tokens for per-channel.
SCHEMES = {"tok": ("token", 0), "tok32": ("token", 32), "ch": ("channel", 0), "ch32": ("channel", 32),
           "ch128": ("channel", 128)}

# (label, K scheme or None, V scheme or None, leading tokens kept in fp16)
CONFIGS = [
    ("fp16 cache (no int8)", "fp16", "fp16", 0),
    ("KV per-token", "tok", "tok", 0),
    ("KV per-token, 32 ch", "tok32", "tok32", 0),
    ("KV per-channel, whole sequence", "ch", "ch", 0),
    ("KV per-channel, 32 tok", "ch32", "ch32", 0),
    ("KV per-channel, 128 tok", "ch128", "ch128", 0),
    ("K per-channel 128 tok + V per-token", "ch128", "tok", 0),
    ("K per-token 32 ch + V per-token", "tok32", "tok", 0),
    ("K per-channel 128 tok + V per-token, token 0 in fp16", "ch128", "tok", 1),
    ("KV per-channel, whole sequence, token 0 in fp16", "ch", "ch", 1),
]


def fake_quant(x: torch.Tensor, scheme: str | None, keep: int) -> torch.Tensor:
    """x (1, heads, tokens, dim) fp32 -> the fp32 value of its int8 round trip, stored as fp16."""
    if scheme is None:
        return x
    y = x.to(torch.float16).to(torch.float32)  # the fp16 cache
    if scheme == "fp16":
        return y
    gran, group = SCHEMES[scheme]
    body = y[:, :, keep:]
    b, h, t, d = body.shape
    if gran == "token":
        g = d if group == 0 or group >= d else group
        assert d % g == 0
        v = body.reshape(b, h, t, d // g, g)
        amax = v.abs().amax(dim=-1, keepdim=True)
    else:
        g = t if group == 0 or group >= t else group
        pad = (-t) % g
        v = torch.nn.functional.pad(body, (0, 0, 0, pad)).reshape(b, h, (t + pad) // g, g, d)
        amax = v.abs().amax(dim=-2, keepdim=True)
    scale = amax / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(v / scale), -127, 127)
    deq = (q * scale).to(torch.float16).to(torch.float32)
    if gran == "token":
        deq = deq.reshape(b, h, t, d)
    else:
        deq = deq.reshape(b, h, t + pad, d)[:, :, :t]
    return torch.cat([y[:, :, :keep], deq], dim=2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(capture_kv.HERE / "text.txt"))
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = pathlib.Path(args.text).read_text(encoding="utf-8")
    tok, model, ids, modules, info = capture_kv.load_smollm2(text)
    model.eval()

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    current = {"k": None, "v": None, "keep": 0}

    def quantized(module, query, key, value, attention_mask, **kwargs):
        key = fake_quant(key, current["k"], current["keep"])
        value = fake_quant(value, current["v"], current["keep"])
        return original(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sdpa", quantized)

    def run():
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1)

    targets = ids[0, 1:]
    t0 = time.time()
    ref = run()
    ref_nll = -ref.gather(1, targets[:, None]).mean()
    ref_top = ref.argmax(dim=-1)
    print(f"# {info['model']}: {ids.shape[1]} tokens, fp32 K/V: perplexity {float(torch.exp(ref_nll)):.3f} "
          f"({time.time() - t0:.0f} s per pass)\n")
    print("| K/V cache | perplexity | change | mean KL(fp32 \\|\\| int8), nats/token | top-1 changed |")
    print("|---|---|---|---|---|")
    for label, k, v, keep in CONFIGS:
        current.update(k=k, v=v, keep=keep)
        out = run()
        nll = -out.gather(1, targets[:, None]).mean()
        kl = (ref.exp() * (ref - out)).sum(dim=-1).mean()
        changed = (out.argmax(dim=-1) != ref_top).float().mean()
        ppl = float(torch.exp(nll))
        print(f"| {label} | {ppl:.3f} | {100 * (ppl / float(torch.exp(ref_nll)) - 1):+.2f}% | {float(kl):.2e} | "
              f"{100 * float(changed):.2f}% |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
