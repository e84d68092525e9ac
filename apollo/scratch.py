r"""Memory models of the update's scratch: the temporaries one optimizer step allocates beside its state.

Each optimizer's spec points to its model (`OptimizerSpec.scratch_bytes`): `scratch_bytes(param, group, *,
name, p, device)`, the bytes of one parameter's update (its param group `group`, p bytes per weight element,
s of the state, n its size, m x n a matrix, k = min(m, n)). The models of the optimizers registered with the
project are here (a new optimizer writes its own beside its math, as apollo/flora.py does); train.memory
reads them through the registry and refuses an optimizer without one. Torch only.

               APOLLO/GaLore fused path (float weights, apollo/fused.py): regular parameters none (torch's
               fused AdamW kernel, in place) unless the state dtype differs from the weights' (then the
               plain spec AdamW, n (s + p)); low-rank weights a chunk at a time: P (p |P|), R and the
               direction (s |R| each) of every weight of the chunk + one weight's transient (P drawn in
               float32, the SVD 4 (n + m k + k n) at a refresh, GaLore's back-projection p n). int8
               weights take the plain path: APOLLO 2 p n (bf16: 6 n), GaLore/SVD as above, + their
               float32 copy 4 n, re-quantised in place (+ n for q, + 4 n of noise when stochastic).
               torch AdamW 2 p n on the CPU, on CUDA p N_all (its foreach path takes sqrt(v) of every
               parameter at once).
               Fira: the SVD at a refresh as GaLore, else R (p |R|), Adam's direction (s |R|), the
               residual G - alpha B(R) (p n) and B(direction) (p n); on the CPU a half-precision
               product is formed in float32 (4 (n + |P| + |R|)).
               SCALE: none for a matrix (the update is one in-place addcmul), but a half-precision
               gradient's norms read a float32 copy (4 n); lm_head's momentum as a matrix, the norms'
               AdamW s n (sqrt v) + s n when casting.
               Muon (torch.optim.Muon): Nesterov's U (p n), then Newton-Schulz in bfloat16 on the
               matrix transposed to k x max(m, n): X (2 n) and at its worst the next X beside A, B
               (k x k each): max(2 n + 6 k^2, 4 n + 4 k^2), + the matmuls' buffers
               (`newton_schulz_buffers`); the AdamW part as torch AdamW.
               Adam-mini: a block's mean square is a norm (a half-precision gradient read in float32:
               4 n), the denominator per block (2 s n only for elementwise blocks).
               SOAP (per m x n, w = 4 the compute bytes): the state in float32 when kept in bf16
               (w (2 m n + 2 m^2 + 2 n^2)) and G (w m n); the direction Q_L (M/(sqrt V + eps)) Q_R^T
               ((1 + sides) w m n) or, at a basis refresh, m in the weight basis + the power step and QR
               (both sides: 1.8 w m n + 4.7 w k^2 + the other new basis; one: w m n + 5 w k^2, measured)
               or m rotated into the new basis ((1 + sides) w m n); the statistics G G^T (w m^2). Not
               counted: the first step's eigh of both sides (~6.1 w k^2 for the larger, measured), which
               runs while the state is still being created.
               8-bit AdamW (bitsandbytes): in place on CUDA; the CPU kernel works in float32 blocks.
               Flora (w = max(p, 4) the working bytes): a compressed momentum U and E(C) (2 w n) beside P
               and D(.) (w (r min(m, n) + |C|)); a factored full momentum U beside G^2's means
               (w (n + m + n')); unfactored U and sqrt(v) (2 w n); + the gradient and weight in w
               (2 w n) for half-precision weights, + w copies of every state when kept in p.

Each model is checked against a measured CPU step (tests/train/test_memory.py).
"""
from __future__ import annotations

import math

import torch

from .fused import NORM_BLOCK_ELEMENTS, step_chunks
from .projection import LEFT, projected_shape, projection_shape, projection_side
from .quant import is_quantized


def newton_schulz_buffers(k: int) -> int:
    """The CPU matmuls' own buffers beside their operands in Newton-Schulz, k = min(m, n): measured 20, 53, 86,
    102, 133 KB at k = 32, 64, 96, 128, 256 and 258 KB from k = 512 on (float32 and bfloat16 alike)."""
    return min(800 * k, 264 * 1024)


def adamw(param: torch.Tensor, group: dict | None, *, name: str, p: int, device: str) -> int:
    """torch.optim.AdamW, per parameter: its CPU for-loop keeps two temporaries of the parameter's size (the
    joint CUDA foreach case, sqrt of every second moment at once, is `step_scratch`'s)."""
    return (1 if device == "cuda" else 2) * p * param.numel()


def mixed(n: int, out: int, operand: int) -> int:
    """An in-place elementwise op into a tensor of `out` bytes per element from operands of another dtype:
    on the CPU torch forms the result in float32 and reads a float32 copy (measured: 8 n; 4 n for add_)."""
    return 8 * n if out != operand else 0


def state_number_bytes(group: dict, p: int) -> int:
    return 4 if group.get("state_dtype") in ("float32", torch.float32) else p


def low_rank_family(param: torch.Tensor, group: dict, *, name: str, p: int, device: str) -> int:
    """APOLLO, APOLLO-Mini, APOLLO-SVD, GaLore: regular parameters (no rank) as the spec AdamW, float low-rank
    weights by the fused step (`fused_step` counts whole chunks), int8 ones by the plain path."""
    n = param.numel()
    s = state_number_bytes(group, p)
    quantized = is_quantized(param)
    if group.get("rank") is None:
        return 0 if s == p and not quantized else n * (s + (p if s != p else 0))
    if not quantized:
        proj_held, proj_transient, held, held_without_r, update = fused_low_rank(
            param, group, name=name, p=p, device=device)
        return max(proj_held + proj_transient, held, held_without_r + update)
    m, k = param.shape[0], min(param.shape)
    svd = 4 * (n + m * k + k * param.shape[1]) + (4 * n if p != 4 else 0)
    apollo_update = max(2 * p * n, p * n + (4 * n if p != 4 else 0))
    if name == "galore":
        return max(p * n, svd)
    return max(apollo_update, svd if group.get("proj") == "svd" else 0)


def fira(param: torch.Tensor, group: dict, *, name: str, p: int, device: str) -> int:
    n = param.numel()
    s = state_number_bytes(group, p)
    if group.get("rank") is None:
        return 0 if s == p and not is_quantized(param) else n * (s + (p if s != p else 0))
    (m, cols), k = param.shape, min(param.shape)
    side = projection_side(param.shape, group.get("proj_type", "std"))
    r_size = math.prod(projected_shape(param.shape, group["rank"], side))
    p_size = math.prod(projection_shape(param.shape, group["rank"], side))
    svd = 4 * (n + m * k + k * cols) + (4 * n if p != 4 else 0)
    # B(X) = P X (or X Q) in the gradient's dtype; on the CPU a half-precision product is formed in float32:
    # float32 operands and result, then the cast
    back = 4 * (p_size + r_size) + 4 * n + p * n if device == "cpu" and p == 2 else p * n
    project = 4 * (n + p_size + r_size) + p * r_size if device == "cpu" and p == 2 else p * r_size
    return max(svd, project,
               p * r_size + s * r_size + back,  # R and its direction while the residual G - alpha B(R) is made
               s * r_size + p * n + back)  # the direction and the residual while B(direction) is made


def scale(param: torch.Tensor, group: dict, *, name: str, p: int, device: str) -> int:
    n = param.numel()
    s = state_number_bytes(group, p)
    rule = group.get("rule")
    upcast = 4 * n if p != 4 else 0  # vector_norm(dtype=float32) of a half-precision matrix reads a float32 copy
    if rule == "column_norm":  # the factor is cast to the gradient's dtype: addcmul_ without a temporary
        return upcast
    if rule == "momentum_column_norm":  # the cast gradient, the norm of M, W.addcmul_(M, factor) across dtypes
        return max(s * n if s != p else 0, 4 * n if s != 4 else 0, mixed(n, p, s))
    return max((s * n if s != p else 0) + s * n, mixed(n, p, s))  # adamw: the cast gradient, sqrt(v)


def muon(param: torch.Tensor, group: dict, *, name: str, p: int, device: str) -> int:
    n = param.numel()
    if group.get("kind") != "muon":  # torch AdamW (per tensor on the CPU; the CUDA foreach case: step_scratch)
        return adamw(param, group, name=name, p=p, device=device)
    k = min(param.shape)
    nesterov = p * n if group.get("nesterov", True) else 0
    newton_schulz = max(2 * 2 * n + 2 * 2 * k * k, 2 * n + 3 * 2 * k * k)  # bfloat16 X, X', A = X X^T, B
    return nesterov + newton_schulz + newton_schulz_buffers(k)


def adam_mini(param: torch.Tensor, group: dict, *, name: str, p: int, device: str) -> int:
    n = param.numel()
    s = state_number_bytes(group, p)
    cast = max(mixed(n, p, s), 4 * n if s != p else 0)  # m += g across dtypes; W.addcdiv_(m, denom) across dtypes
    if group.get("block") == "elementwise":
        return max(2 * s * n, cast)
    return max(4 * n if s != p else 0, cast)  # the block norms of a half-precision gradient read a float32 copy


def soap(param: torch.Tensor, group: dict, *, name: str, p: int, device: str) -> int:
    n = param.numel()
    s = state_number_bytes(group, p)
    w = max(s, 4)  # eigh/QR have no half-precision kernels: the work dtype is at least float32
    if param.dim() != 2:
        return (s * n if s != p else 0) + s * n  # functional.adamw_update: the cast gradient, sqrt(v)
    m, cols = param.shape
    limit = group.get("max_precond_dim", 10000)
    sides = [size for size in (m, cols) if size <= limit]
    squares = sum(size * size for size in sides)
    held = (w * (2 * n + 2 * squares) if s != w else 0) + (w * n if p != w else 0)  # work copies of state and G
    # M / (sqrt(V) + eps), then one product per rotated side (the previous result alive)
    direction = (1 + max(len(sides), 1)) * w * n + (p * n if p != w else 0)
    statistics = w * max(sides, default=0) ** 2
    # a basis refresh: m in the weight basis (w m n) beside the power step L Q, its reordering, QR's Q and R
    # (4-5 w k^2 measured), the other side's new basis while the second is made; then m rotated back
    if len(sides) == 2:  # 4.4-4.65 w k^2 measured for k = 300-1000 beside a 128 side: the larger constant
        refresh = int(1.8 * w * n) + max(int(4.7 * w * sides[0] ** 2),
                                         int(4.7 * w * sides[1] ** 2) + w * sides[0] ** 2)
    else:
        refresh = w * n + 5 * w * max(sides, default=0) ** 2
    return held + max(direction, statistics, refresh, (1 + len(sides)) * w * n)


def adamw8bit(param: torch.Tensor, group: dict, *, name: str, p: int, device: str) -> int:
    n = param.numel()
    if device == "cuda":
        return 0  # bitsandbytes' CUDA kernel dequantises, updates and re-quantises in registers
    # the CPU kernel, measured: five float32 tensors of the parameter's size (+ the gradient read in float32)
    return 5 * 4 * n + (4 * n if p != 4 else 0)


def fused_low_rank(param: torch.Tensor, group: dict, *, name: str, p: int,
                            device: str = "cuda") -> tuple[int, int, int, int, int]:
    """Bytes of one float weight in apollo's fused low-rank step (apollo/fused.py), by phase of its chunk:

    (P held, P transient) while the chunk's projections are made: a random P not stored (p |P|), drawn in
    float32 and cast (+ 4 |P|), or on the CPU G's column norms for channel scaling of a left-projected G
    (a float32 block of rows squared, 4 b cols with b = min(m, 2^19 / cols), + its float32 copy); an SVD
    P is state, its refresh takes 4 (n + m k + k n) (+ 4 n to cast);
    (held, held without R, transient) while the chunk is updated: P, R cast to the state dtype and the
    normalised direction (s |R| each); GaLore frees R before it back-projects one weight at a time
    (p n, + p |R| to cast the direction). On the CPU, half-precision matmuls run in float32
    (fused.matmul_operands): the projection adds 4 (n + |P| + |R|) (not at rank 1), GaLore's back-projection
    4 (|R| + |P| + n).
    """
    s = state_number_bytes(group, p)
    side = projection_side(param.shape, group.get("proj_type", "std"))
    r_size = math.prod(projected_shape(param.shape, group["rank"], side))
    p_size = math.prod(projection_shape(param.shape, group["rank"], side))
    svd_kind = name == "galore" or group.get("proj") == "svd"
    n, (m, cols), k = param.numel(), param.shape, min(param.shape)
    proj_held = 0 if svd_kind or group.get("store_projection") else p * p_size
    proj_transient = (4 * (n + m * k + k * cols) + (4 * n if p != 4 else 0) if svd_kind
                      else (4 * p_size if p != 4 else 0))
    update_transient = p * n + (p * r_size if s != p else 0) if name == "galore" else 0
    if group.get("scale_type") == "channel" and device == "cpu" and side == LEFT:
        # G's column norms on the CPU (fused._norms): a float32 block of rows squared (+ its float32 copy)
        rows = min(m, max(1, NORM_BLOCK_ELEMENTS // cols))
        proj_transient = max(proj_transient, 4 * cols + (4 if p == 4 else 8) * rows * cols)
    if device == "cpu" and p == 2:
        if group["rank"] > 1:  # a rank-1 projection stays in half precision (fused.projection_operands)
            proj_transient = max(proj_transient, 4 * (n + p_size + r_size))
        update_transient += 4 * (r_size + p_size + n) if name == "galore" else 0
    return proj_held, proj_transient, proj_held + 2 * s * r_size, proj_held + s * r_size, update_transient


def fused_step(group: dict, *, name: str, p: int, device: str = "cuda") -> int:
    """The fused low-rank step's scratch for a param group: its largest chunk (`fused.step_chunks`: moment
    numbers, and on the CPU gradient numbers too), at the larger of its two phases (`fused_low_rank`)."""
    params = [q for q in group["params"] if not is_quantized(q)]
    if not params:
        return 0
    terms = [fused_low_rank(q, group, name=name, p=p, device=device) for q in params]
    sizes = [math.prod(projected_shape(q.shape, group["rank"], projection_side(q.shape, group.get("proj_type", "std"))))
             for q in params]
    return max(max(sum(t[0] for t in terms[a:b]) + max(t[1] for t in terms[a:b]),
                   sum(t[2] for t in terms[a:b]),
                   sum(t[3] for t in terms[a:b]) + max(t[4] for t in terms[a:b]))
               for a, b in step_chunks(sizes, [q.numel() for q in params], torch.device(device)))
