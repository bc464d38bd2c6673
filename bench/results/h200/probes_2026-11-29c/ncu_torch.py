# torch.compile's fp32 given-scales quantize and dequantize, fp16 dequantize, at 131072 x 8192, as
# bench/compare_torch.py writes them; one call each inside cudaProfilerStart/Stop (ncu
# --profile-from-start off), after compiling (and Inductor's autotuning) outside the range.
import sys, torch
sys.path.insert(0, "bench")  # run from the repository root
from compare_torch import make_ops
ops = make_ops(torch)
t, d = 131072, 8192
x = (torch.rand(t, d, device="cuda") * 2 - 1)
q, scale = ops["per_channel"](x)
xh = x.half()
given = torch.compile(ops["given"], dynamic=False)
deq = torch.compile(ops["dequantize"], dynamic=False)
deqh = torch.compile(ops["dequantize"], dynamic=False)
for _ in range(3):
    given(x, scale); deq(q, scale, torch.float32); deqh(q, scale, torch.float16)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
given(x, scale); deq(q, scale, torch.float32); deqh(q, scale, torch.float16)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print("torch driver done")
