import torch, fused_attention as fa
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
N, D = 400, 128
q = torch.randn(N, D, generator=g); k = torch.randn(N, D, generator=g)
s64 = (q.double() * k.double()).sum(-1)
ulp = lambda x: torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(x.abs()))
def stats(name, s):
    e = ((s.double() - s64).abs() / ulp(s64.float()).double())
    print(f"{name:28s} mean {e.mean():.3f} ulp, p99 {e.quantile(0.99):.2f}, max {e.max():.2f}")
stats("torch mm 1x128 @ 128x1", torch.stack([q[i:i+1] @ k[i:i+1].T for i in range(N)]).flatten())
stats("torch mm NxD @ DxN diag", torch.diagonal(q @ k.T))
stats("torch (q*k).sum", (q * k).sum(-1))
# ours: lse of one query row against one key with scale 1 (= the score), decode path and blocked path
lse_dec = torch.stack([fa.scaled_dot_product_attention(q[i].view(1,1,1,D), k[i].view(1,1,1,D), k[i].view(1,1,1,D), scale=1.0, backend="cpu", return_lse=True)[1].flatten() for i in range(N)]).flatten()
stats("ours L=1 S=1 (decode)", lse_dec)
lse_blk = torch.stack([fa.scaled_dot_product_attention(q[i].view(1,1,1,D).expand(1,1,40,D).contiguous(), k[i].view(1,1,1,D), k[i].view(1,1,1,D), scale=1.0, backend="cpu", return_lse=True)[1].flatten()[0] for i in range(N)]).flatten()
stats("ours L=40 S=1 (blocked)", lse_blk)
# 16 lanes x 8 sequential then pairwise tree
acc = torch.zeros(N, 16)
for st in range(8):
    acc = (acc + q[:, st*16:(st+1)*16] * k[:, st*16:(st+1)*16])  # not fused: 2 roundings
stats("16 lanes x 8 (unfused)", acc.sum(-1))
