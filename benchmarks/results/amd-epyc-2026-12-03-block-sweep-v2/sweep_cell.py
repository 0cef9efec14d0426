"""One cell of the block-size sweep (sweep.md): THREADS D "BM,KIB;..." RULE ROUNDS."""
import sys, time, torch, fastmine, statistics
from benchmarks.providers import blocked_matmul
torch.set_num_threads(int(sys.argv[1]))
n, d = 8192, int(sys.argv[2])
cfgs = sys.argv[3].split(";")
g = torch.Generator().manual_seed(0)
x = torch.randn(n, d, generator=g); y = (torch.arange(n) // 8)[torch.randperm(n, generator=g)]
kw = dict(pos_strategy="easy", neg_strategy=sys.argv[4] if len(sys.argv) > 4 else "hard")
if kw["neg_strategy"] == "semihard": kw["margin"] = 0.2
times = {c: [] for c in ["floor"] + cfgs}
for c in cfgs:
    torch.ops.fastmine._set_cpu_overrides(block=c); fastmine.mine(x, y, backend="cpu", **kw)
blocked_matmul(x, x)
for r in range(int(sys.argv[5]) if len(sys.argv) > 5 else 11):
    a = time.perf_counter(); blocked_matmul(x, x); times["floor"].append(time.perf_counter() - a)
    for c in cfgs:
        torch.ops.fastmine._set_cpu_overrides(block=c)
        a = time.perf_counter(); fastmine.mine(x, y, backend="cpu", **kw); times[c].append(time.perf_counter() - a)
fl = statistics.median(times["floor"])
print(f"threads {sys.argv[1]} D {d} {kw['neg_strategy']}: floor {fl*1e3:.1f} ms", " | ".join(f"{c or 'default'}: {statistics.median(times[c])/fl:.2f}" for c in cfgs), flush=True)
