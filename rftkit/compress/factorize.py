"""Low-rank factorization (SVD) and weight sharing (k-means codebooks) of linear layers.

    record = low_rank(model, energy=0.9)          # W [N, K] -> U [N, R] @ V [R, K] where that is smaller
    record = weight_share(model, clusters=16)     # W -> codebook [C] indexed by 4-bit (C <= 16) or 8-bit codes

SVD. W = sum_i s_i u_i v_i^T; keeping the R largest singular values gives the best rank-R approximation in
Frobenius norm (Eckart-Young), with relative error ||W - W_R|| / ||W|| = sqrt(1 - sum_{i<=R} s_i^2 / sum s_i^2).
R is the smallest rank whose retained energy sum_{i<=R} s_i^2 / sum s_i^2 reaches `energy` (or a fixed
`rank`). A factorization only pays when R (N + K) < N K: a matrix whose rank would not shrink it stays dense
(the record says so). U carries the singular values (U = u * s), so a LoRA on top and the forward are two
plain matmuls: y = (x V^T) U^T.

k-means. All entries of one matrix are clustered into C shared values (1-D Lloyd iterations: assignment by
bucketing against the midpoints of the sorted centroids, update by per-cluster means; initialised at the
quantiles so no cluster starts empty). The matrix is stored as codes (two per byte when C <= 16) plus the C
floats; in memory the looked-up dense weight is built on the first forward and multiplied with MKL (the
saving is on disk and in transfer, as for GGUF files run dequantized). 16 centroids placed where the weights are
dense beat 16 evenly spaced levels over [min, max] (uniform 4-bit) on the bell-shaped weights of trained
layers: that is the tested claim.

The tensors are registered as parameters (U, V) and buffers (codes, codebook) of one module, not as child
nn.Linear modules, so adapter banks and LoRA see one linear layer at the usual path.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {p: m for p, m in model.named_modules() if type(m) is nn.Linear and p != "lm_head"}


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


# ----------------------------------------------------------------------------------------------------------
# low rank

def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest R with sum_{i<R} s_i^2 >= energy * sum s_i^2 (s sorted descending)."""
    e = s.double().pow(2)
    frac = e.cumsum(0) / e.sum()
    return int((frac < energy - 1e-12).sum()) + 1


class LowRankLinear(nn.Module):
    """y = x V^T U^T (+ b), U [N, R], V [R, K]."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} is outside [1, {min(in_features, out_features)}] for a "
                             f"{out_features}x{in_features} matrix")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.U = nn.Parameter(torch.zeros(out_features, rank, device=device), requires_grad=False)
        self.V = nn.Parameter(torch.zeros(rank, in_features, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        w = linear.weight.detach().float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        m = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, w.device)
        m.U.copy_(u[:, :rank] * s[:rank])
        m.V.copy_(vh[:rank])
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    @property
    def weight(self) -> torch.Tensor:
        return self.U @ self.V                                                           # [N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@torch.no_grad()
def low_rank(model: nn.Module, energy: float = 0.9, rank: int = 0) -> dict:
    """Factorize every linear (not the lm_head) that gets smaller: rank from `energy`, or `rank` if > 0.
    Returns {path: {"kind": "lowrank", "rank", "energy"}} for the factorized ones, {"kind": "dense", ...}
    for those kept."""
    if rank == 0 and not 0 < energy < 1:
        raise ValueError(f"energy must be in (0, 1), got {energy}")
    lins = _linears(model)
    for path, m in lins.items():                           # every check before any work
        if rank < 0 or rank > min(m.in_features, m.out_features):
            raise ValueError(f"rank {rank} is larger than {path} allows ({m.out_features}x{m.in_features}: "
                             f"at most {min(m.in_features, m.out_features)})")
    record = {}
    for path, m in lins.items():
        s = torch.linalg.svdvals(m.weight.detach().float())
        r = rank or rank_for_energy(s, energy)
        kept = float(s[:r].pow(2).sum() / s.pow(2).sum())
        N, K = m.out_features, m.in_features
        if r * (N + K) >= N * K:
            record[path] = {"kind": "dense", "rank_needed": r, "energy": kept}
            continue
        _swap(model, path, LowRankLinear.from_linear(m, r))
        record[path] = {"kind": "lowrank", "rank": r, "energy": kept}
    return record


# ----------------------------------------------------------------------------------------------------------
# weight sharing

def kmeans_1d(x: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n] -> (centroids [k] sorted ascending, codes [n] int64) by Lloyd iterations from quantile init."""
    x = x.float()
    c = torch.quantile(x[torch.randperm(len(x))[:1 << 20]] if len(x) > 1 << 20 else x,
                       (torch.arange(k, dtype=torch.float32) + 0.5) / k)
    for _ in range(iters):
        c = c.sort().values
        codes = torch.bucketize(x, (c[1:] + c[:-1]) / 2)                                # nearest centroid
        sums = torch.zeros(k).index_add_(0, codes, x)
        counts = torch.bincount(codes, minlength=k).float()
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        if torch.equal(new, c):
            break
        c = new
    c = c.sort().values
    return c, torch.bucketize(x, (c[1:] + c[:-1]) / 2)


def uniform_levels(x: torch.Tensor, k: int) -> torch.Tensor:
    """x rounded to k evenly spaced levels over [min, max] (uniform quantization with one range per matrix)."""
    lo, hi = x.min(), x.max()
    step = (hi - lo) / (k - 1)
    return torch.round((x - lo) / step) * step + lo


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15, K even -> [N, K/2] uint8, byte j = codes[2j] | codes[2j+1] << 4."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


class SharedLinear(nn.Module):
    """A linear layer whose weight takes `clusters` distinct values: codes (4-bit packed when clusters <= 16,
    else one byte) + codebook [clusters]."""

    def __init__(self, in_features: int, out_features: int, clusters: int = 16, bias: bool = False, device=None):
        super().__init__()
        if not 2 <= clusters <= 256:
            raise ValueError(f"clusters must be in [2, 256] (one byte per index), got {clusters}")
        self.in_features, self.out_features, self.clusters = in_features, out_features, clusters
        self.packed = clusters <= 16 and in_features % 2 == 0
        width = in_features // 2 if self.packed else in_features
        self.register_buffer("codes", torch.zeros(out_features, width, dtype=torch.uint8, device=device))
        self.register_buffer("codebook", torch.zeros(clusters, device=device))
        self.register_buffer("dense", None, persistent=False)   # the looked-up weight, built on first forward
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, clusters: int) -> "SharedLinear":
        w = linear.weight.detach().float()
        m = cls(linear.in_features, linear.out_features, clusters, linear.bias is not None, w.device)
        book, codes = kmeans_1d(w.reshape(-1), clusters)
        codes = codes.view(w.shape)
        m.codebook.copy_(book)
        m.codes = pack_codes(codes) if m.packed else codes.to(torch.uint8)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    @property
    def weight(self) -> torch.Tensor:
        codes = unpack_codes(self.codes) if self.packed else self.codes
        return self.codebook[codes.long()]                                               # [N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weight sharing saves storage and transfer, not matmul work: looking the codebook up on every call
        # cost 7x in decode speed, so the dense weight is built once and kept (not saved; codes stay the truth)
        if self.dense is None or self.dense.dtype != x.dtype:
            self.dense = self.weight.to(x.dtype)
        return F.linear(x, self.dense, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, clusters={self.clusters}"


@torch.no_grad()
def weight_share(model: nn.Module, clusters: int = 16, seed: int = 0) -> dict:
    """Cluster every linear (not the lm_head) into `clusters` shared values. Returns {path: {"kind": "kmeans",
    "clusters", "rel_error"}}."""
    if not 2 <= clusters <= 256:
        raise ValueError(f"clusters must be in [2, 256] (one byte per index), got {clusters}")
    torch.manual_seed(seed)                                 # the subsample of very large matrices
    record = {}
    for path, m in _linears(model).items():
        new = SharedLinear.from_linear(m, clusters)
        err = float((new.weight - m.weight).norm() / m.weight.norm())
        _swap(model, path, new)
        record[path] = {"kind": "kmeans", "clusters": clusters, "rel_error": err}
    return record
