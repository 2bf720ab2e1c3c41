"""Builds and runs the official Infinity transformer (PyTorch, CPU, random weights) for parity tests of ours.

The official code is imported at run time from a checkout of github.com/FoundationVision/Infinity (see
`infinity_jax.parity.import_official`); nothing of it is copied here. Its import chain needs packages that a CPU test
environment lacks, so `load_official_infinity` puts stand-ins written here in `sys.modules` while it imports:

- `flash_attn`: `flash_attn_func` and `flash_attn_varlen_kvpacked_func` in plain torch (`flash_attn.ops` stays absent,
  so basic.py falls back to its unfused ops, as without the fused flash-attn kernels);
- `timm`, `timm.models`, `timm.models.layers`: `register_model` (returns the function) and `DropPath`/`drop_path`;
- `infinity.models.fused_op`: the official one wraps its norms in `torch.compile`; the stand-in is our eager AdaLN;
- `pytz` (imported by infinity/utils/dist.py and misc.py, used only for log time stamps), only where it is missing.

infinity/utils/dist.py itself needs no stand-in: it runs single-process on CPU when torch.distributed is not
initialised (rank 0, world size 1, device "cpu", barrier and all-reduce do nothing).

The official code casts to float32 with `.float()` in many places (inputs, norms, the adaptive-norm conditions, the
head), so a float64 model would fail or silently lose precision. With `dtype=torch.float64` the runners below make
`Tensor.float()` leave float64 tensors unchanged (as it leaves float32 tensors unchanged) while they run, so the whole
official computation runs in float64. The RoPE tables are the exception: the model keeps them in a plain dict of
float32 tensors (cos/sin of float32 angles), which `model.to()` does not convert; they are used as they are.

Self-check (needs torch, einops and the checkout):
    cd /work/main && .venv/bin/python -m tests.parity.official_infinity /path/to/Infinity
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import itertools
import math
import sys
import types
import warnings
import zoneinfo
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from infinity_jax.parity import import_official

# ----------------------------------------------------------------------------------------------------------------------
# Stand-ins for the packages the official import chain needs.


def _attend(q, k, v, softmax_scale):
    """Softmax attention of q [Lq, H, c] over k, v [Lk, H, c], computed like flash-attn: half-precision inputs are
    computed in float32 (flash-attn accumulates in float32), float32/float64 inputs in their own dtype; the result has
    the dtype of q."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("qhc,khc->hqk", q.to(compute), k.to(compute)) * softmax_scale
    out = torch.einsum("hqk,khc->qhc", scores.softmax(dim=-1), v.to(compute))
    return out.to(q.dtype)


def _flash_attn_stand_in():
    """A `flash_attn` module with the two functions basic.py imports (no dropout, no causal mask)."""
    module = types.ModuleType("flash_attn")
    module.calls = (
        Counter()
    )  # (function name, dtype of q) -> number of calls: shows which branch the official code took

    def flash_attn_varlen_kvpacked_func(
        q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False
    ):
        """q [total_q, H, c], kv [total_k, 2, H, c]; sequence i is rows cu_seqlens[i]:cu_seqlens[i+1] of each."""
        if dropout_p or causal:
            raise NotImplementedError("the stand-in supports dropout_p=0 and causal=False only")
        module.calls["flash_attn_varlen_kvpacked_func", q.dtype] += 1
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert len(bounds_q) == len(bounds_k), (bounds_q, bounds_k)
        assert max(np.diff(bounds_q)) <= max_seqlen_q and max(np.diff(bounds_k)) <= max_seqlen_k
        out = torch.zeros_like(q)
        for (q0, q1), (k0, k1) in zip(itertools.pairwise(bounds_q), itertools.pairwise(bounds_k), strict=True):
            out[q0:q1] = _attend(q[q0:q1], kv[k0:k1, 0], kv[k0:k1, 1], scale)
        return out

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        """q, k, v [B, L, H, c] -> [B, Lq, H, c]."""
        if dropout_p or causal:
            raise NotImplementedError("the stand-in supports dropout_p=0 and causal=False only")
        module.calls["flash_attn_func", q.dtype] += 1
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        return torch.stack([_attend(q[b], k[b], v[b], scale) for b in range(q.shape[0])])

    module.flash_attn_varlen_kvpacked_func = flash_attn_varlen_kvpacked_func
    module.flash_attn_func = flash_attn_func
    return module


def _drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """Stochastic depth: zeroes whole samples with probability drop_prob while training (timm's semantics)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return x * mask


class _DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        return _drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


def _timm_stand_ins():
    timm, models, layers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers"))
    models.register_model = lambda fn: fn
    layers.DropPath, layers.drop_path = _DropPath, _drop_path
    timm.models, models.layers = models, layers
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers}


def _fused_op_stand_in():
    """infinity.models.fused_op, whose norms are torch.compile'd: our eager AdaLN, LN(x)·(1 + scale) + shift in
    float32 (REFERENCE §3.5). Only the LayerNorm variant is used by the released models; the RMSNorm one must exist
    for the import (or the official code silently falls back to its unfused path, see REFERENCE §8.1)."""
    module = types.ModuleType("infinity.models.fused_op")

    def fused_ada_layer_norm(C, eps, x, scale, shift):
        x = x.float()
        mean = x.mean(dim=-1, keepdim=True)
        var = (x - mean).square().mean(dim=-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps) * (1 + scale) + shift

    def fused_ada_rms_norm(C, eps, x, scale, shift):
        raise NotImplementedError("the released models use LayerNorm (rms_norm=False)")

    module.fused_ada_layer_norm = fused_ada_layer_norm
    module.fused_ada_rms_norm = fused_ada_rms_norm
    return module


FLASH_ATTN = _flash_attn_stand_in()  # its `calls` counter records every attention call of the official model


@contextlib.contextmanager
def _stand_ins():
    """Puts the stand-ins in sys.modules for the duration of the official imports, then restores what was there."""
    stand_ins = {"flash_attn": FLASH_ATTN, **_timm_stand_ins(), "infinity.models.fused_op": _fused_op_stand_in()}
    if importlib.util.find_spec("pytz") is None:
        stand_ins["pytz"] = types.ModuleType("pytz")
        stand_ins["pytz"].timezone = zoneinfo.ZoneInfo
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@contextlib.contextmanager
def running(dtype):
    """No gradients, no deprecation warnings of the official `torch.cuda.amp.autocast` calls and, with float64,
    `Tensor.float()` returning float64 tensors unchanged (other dtypes still go to float32) so that the official code's
    float32 casts keep the float64 computation."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast", category=FutureWarning)
        if dtype == torch.float32:
            yield
            return
        if dtype != torch.float64:
            raise ValueError(f"dtype must be torch.float32 or torch.float64, not {dtype}")
        had_own = "float" in torch.Tensor.__dict__
        original = torch.Tensor.float

        def float_(self, *args, **kwargs):
            return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

        torch.Tensor.float = float_
        try:
            yield
        finally:
            if had_own:
                torch.Tensor.float = original
            else:
                del torch.Tensor.float


# ----------------------------------------------------------------------------------------------------------------------
# Loading and building.


def load_official_infinity(checkout: str) -> types.SimpleNamespace:
    """Imports the official transformer from `checkout`.

    Returns a namespace of module objects: `infinity` (infinity.models.infinity), `basic` (infinity.models.basic),
    `multiscale_bsq` (infinity.models.bsq_vae.multiscale_bsq), `dynamic_resolution` (infinity.utils.dynamic_resolution)
    and `flash_attn` (the stand-in, whose `calls` counter records the attention calls).
    """
    with _stand_ins():
        infinity = import_official(checkout, "infinity.models.infinity")
    return types.SimpleNamespace(
        infinity=infinity,
        basic=sys.modules["infinity.models.basic"],
        multiscale_bsq=import_official(checkout, "infinity.models.bsq_vae.multiscale_bsq"),
        dynamic_resolution=sys.modules["infinity.utils.dynamic_resolution"],
        flash_attn=FLASH_ATTN,
    )


def randomize_parameters(model: nn.Module, seed: int) -> None:
    """Fills every parameter with random float32 values (exactly representable in float32, so a float64 copy holds the
    same weights). The default init zeroes biases and shrinks the head and adaptive-norm weights, which would hide
    errors; here every parameter matters and activations stay O(1) at any width:

    - weight matrices (Linear, and the mat_kv/mat_qkv projections): normal(0, 1/sqrt(fan_in));
    - biases, q_bias/v_bias, ada_gss, pos_start, lvl_embed, cfg_uncond: normal(0, 0.1);
    - gains of the affine norms (text_norm, ca_norm): 1 + normal(0, 0.1);
    - the attention-pool query (text_proj_for_sos.ca.mat_q, [1, H, c]): normal(0, 1), so that pooling is not uniform;
    - scale_mul_1H11 (log of the cosine-attention scale): ln(4) + uniform(-0.3, 0.3).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            shape = param.shape
            if leaf == "scale_mul_1H11":
                value = math.log(4.0) + (torch.rand(shape, generator=gen) * 0.6 - 0.3)
            elif name.endswith("text_proj_for_sos.ca.mat_q"):
                value = torch.randn(shape, generator=gen)
            elif name.endswith("norm.weight") and param.ndim == 1:
                value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            elif param.ndim == 1 or leaf in ("ada_gss", "pos_start", "cfg_uncond") or name == "lvl_embed.weight":
                value = 0.1 * torch.randn(shape, generator=gen)
            elif param.ndim == 2:
                value = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
            else:
                raise ValueError(f"no random init rule for parameter {name} {tuple(shape)}")
            param.copy_(value.to(torch.float32))


def build_official_infinity(
    mods, *, depth, embed_dim, num_heads, bits, text_dim, text_maxlen, block_chunks, seed, quiet=True
) -> nn.Module:
    """The official `Infinity` configured as the released models, float32, eval mode, random weights (see
    `randomize_parameters`).

    Constraints of the official code: the text attention pool has text_dim // 128 heads (text_dim // 64 when
    embed_dim > 4096) of embed_dim / heads channels, so text_dim >= 128 and the head count must divide embed_dim; the
    FFN width is round(4 * embed_dim / 256) * 256 (Python rounding: 0 for embed_dim <= 32); depth must be a multiple of
    block_chunks.
    """
    vae_local = types.SimpleNamespace(
        embed_dim=bits,
        vocab_size=2**bits,
        quantizer=types.SimpleNamespace(lfq=types.SimpleNamespace(mask=2 ** torch.arange(bits - 1, -1, -1))),
    )
    config = dict(
        text_channels=text_dim, text_maxlen=text_maxlen,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0,
        drop_rate=0.0, drop_path_rate=0.0,
        norm_eps=1e-6, rms_norm=False, shared_aln=True, head_aln=True,
        cond_drop_rate=0.0, rand_uncond=False,
        cross_attn_layer_scale=-1.0, nm0=False, tau=1, cos_attn=True, swiglu=False, head_depth=1,
        top_p=0.0, top_k=0.0,
        customized_flash_attn=False, fused_mlp=False, fused_norm=True,
        block_chunks=block_chunks, checkpointing="full-block", pad_to_multiplier=128, use_flex_attn=False,
        add_lvl_embeding_only_first_block=1, use_bit_label=1,
        rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2,
        apply_spatial_patchify=0, inference_mode=True, train_h_div_w_list=[1.0],
    )  # fmt: skip
    # The constructor draws from the global RNG (trunc_normal_, randn) and prints its configuration.
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO() if quiet else sys.stdout):
        model = mods.infinity.Infinity(vae_local, **config)
    randomize_parameters(model, seed)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs.


def _scale_schedule(schedule_hw):
    """[(h, w), ...] -> the official [(1, h, w), ...] with Python ints (the RoPE tables are keyed by its str())."""
    return [(1, int(h), int(w)) for h, w in schedule_hw]


def packed_text(text, text_mask, dtype=torch.float64):
    """Padded text [B, T, C] and mask [B, T] (a prefix of True of length >= 1 per sample) -> the official packed
    condition (kv_compact [sum(lens), C], lens (list of int), cu_seqlens_k int32 [B + 1] with a leading 0,
    max_seqlen_k)."""
    text, mask = np.asarray(text), np.asarray(text_mask, dtype=bool)
    lens = mask.sum(axis=1)
    if (lens < 1).any() or (mask != (np.arange(mask.shape[1]) < lens[:, None])).any():
        raise ValueError("text_mask must be a prefix of True (at least one) then False in every row")
    kv_compact = torch.cat([torch.as_tensor(text[i, :n]) for i, n in enumerate(lens)]).to(dtype)
    cu_seqlens_k = torch.as_tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    return kv_compact, [int(n) for n in lens], cu_seqlens_k, int(lens.max())


def _bit_quantizer(bits):
    """The official multi-scale BSQ quantizer (no parameters are involved): `.lfq.indices_to_codes` turns bit labels
    [B, 1, h, w, d] into codes (2 * bit - 1) / sqrt(d) [B, d, 1, h, w]; `.z_interplote_up` is "trilinear"."""
    msbsq = importlib.import_module("infinity.models.bsq_vae.multiscale_bsq")
    return msbsq.MultiScaleBSQ(dim=bits, codebook_size=2**bits, new_quant=True, schedule_mode="dynamic")


def _bit_labels(gt_bits_per_scale, schedule_hw, dtype):
    """Per-scale 0/1 bits ([B, h, w, d] or [B, h*w, d]) -> the official bit labels [B, 1, h, w, d] as `dtype` (float
    labels keep the codes in `dtype`; integer labels would make float32 codes)."""
    labels = []
    for b, (h, w) in zip(gt_bits_per_scale, schedule_hw, strict=True):
        b = np.asarray(b)
        labels.append(torch.as_tensor(b.reshape(b.shape[0], 1, h, w, b.shape[-1]), dtype=dtype))
    return labels


def official_teacher_forced_inputs(gt_bits_per_scale, schedule_hw, dtype=torch.float64):
    """x_wo_prefix [B, L - 1, d] numpy for the given bits, built as the official Bitwise Self-Correction builds the
    training inputs when it flips nothing: with codes_k the codes of scale k and (H, W) the last grid,
    sum_k = sum_{j <= k} up(codes_j, (H, W)) and the input of scale k + 1 is up(sum_k, grid_{k+1}), where up is the
    quantizer's trilinear (bilinear in h, w; align_corners=False) interpolation. Same for the official KV-cached
    inference loop."""
    quantizer = _bit_quantizer(np.asarray(gt_bits_per_scale[0]).shape[-1])
    schedule = _scale_schedule(schedule_hw)
    summed, inputs = 0, []
    with torch.no_grad():
        for si, labels in enumerate(_bit_labels(gt_bits_per_scale, schedule_hw, dtype)):
            codes = quantizer.lfq.indices_to_codes(labels, label_type="bit_label")  # [B, d, 1, h, w]
            summed = summed + F.interpolate(codes, size=schedule[-1], mode=quantizer.z_interplote_up)
            if si + 1 < len(schedule):
                nxt = F.interpolate(summed, size=schedule[si + 1], mode=quantizer.z_interplote_up)
                inputs.append(nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1))
    return torch.cat(inputs, dim=1).numpy()


def split_by_scale(logits, schedule_hw):
    """[B, L, V] -> a list of [B, h*w, V], one per scale."""
    ends = np.cumsum([h * w for h, w in schedule_hw])
    return np.split(np.asarray(logits), ends[:-1], axis=1)


# ----------------------------------------------------------------------------------------------------------------------
# Runners.


def official_forward_logits(model, text, text_mask, x_wo_prefix, schedule_hw, dtype=torch.float64):
    """The official full-sequence (training) forward with the block-causal mask.

    text [B, T, text_dim], text_mask [B, T] bool (prefix of True), x_wo_prefix [B, L - 1, bits] (the inputs of scales
    2.. in order, row-major h, w), schedule_hw [(h, w), ...] (its (1, h, w) form must be a key of
    model.rope2d_freqs_grid: one of the official schedules, or a prefix registered by `alias_schedule_prefix`).
    Converts the model to `dtype` (in place). Returns logits [B, L, 2 * bits] numpy in `dtype`, index 2 * j + b being
    the logit of bit j having value b (bit 0 is the most significant).
    """
    schedule = _scale_schedule(schedule_hw)
    x = torch.as_tensor(np.asarray(x_wo_prefix), dtype=dtype)
    length = sum(t * h * w for t, h, w in schedule)
    if x.shape[1] != length - 1 or x.shape[2] != model.d_vae:
        raise ValueError(f"x_wo_prefix {tuple(x.shape)} does not match L - 1 = {length - 1} and bits = {model.d_vae}")
    model.to(dtype).eval()
    model.cond_drop_rate = 0.0  # the forward replaces a sample's text by cfg_uncond with this probability
    with running(dtype):
        logits = model(packed_text(text, text_mask, dtype), x, scale_schedule=schedule)
    return logits.numpy()


def official_cached_logits(model, text, text_mask, gt_bits_per_scale, schedule_hw, dtype=torch.float64):
    """The official KV-cached inference loop (`autoregressive_infer_cfg`), teacher-forced with the given bits.

    cfg = 1 and tau = 1 on every scale (no unconditional branch); gt_leak = number of scales, so the bits sampled at
    each scale are replaced by gt_bits_per_scale[k] ([B, h, w, bits] or [B, h*w, bits], 0/1) and the inputs of later
    scales come from the given bits. The logits are captured from `model.get_logits`. Converts the model to `dtype`
    (in place). Returns a list, one per scale, of logits [B, h*w, 2 * bits] numpy in `dtype` (layout as in
    `official_forward_logits`).
    """
    schedule = _scale_schedule(schedule_hw)
    labels = _bit_labels(gt_bits_per_scale, schedule_hw, dtype)
    vae = types.SimpleNamespace(quantizer=_bit_quantizer(labels[0].shape[-1]))
    cond = packed_text(text, text_mask, dtype)
    model.to(dtype).eval()
    recorded = []
    get_logits = model.get_logits

    def recording_get_logits(h, cond_BD):
        out = get_logits(h, cond_BD)
        recorded.append(out.detach().clone())
        return out

    model.get_logits = recording_get_logits  # an instance attribute shadows the method
    try:
        # The loop still samples (then discards) bits from the global RNG; fork it to leave the caller's stream as is.
        with running(dtype), torch.random.fork_rng(devices=[]):
            model.autoregressive_infer_cfg(
                vae=vae, scale_schedule=schedule, label_B_or_BLT=cond, B=len(cond[1]),
                cfg_list=[1.0] * len(schedule), tau_list=[1.0] * len(schedule), cfg_insertion_layer=[],
                top_k=0, top_p=0.0, returns_vemb=1, vae_type=1, ret_img=False,
                gt_leak=len(schedule), gt_ls_Bl=labels, inference_mode=True,
            )  # fmt: skip
    finally:
        del model.get_logits
        for block in model.unregistered_blocks:  # the loop leaves the caches off only when it completes
            block.sa.kv_caching(False)
    assert len(recorded) == len(schedule), (len(recorded), len(schedule))
    return [logits.numpy() for logits in recorded]


def official_rope_table(model, schedule_hw):
    """The RoPE table the official self-attention uses for a schedule: [2 (cos, sin), L, head_dim / 2] float32 numpy.
    Channel pair i of a head is rotated by angle table[:, l, i]; the first half of the pairs uses the row, the second
    half the column (mode 2 places scale k's grid on the last grid of the 1M schedule of the same aspect ratio)."""
    schedule = _scale_schedule(schedule_hw)
    table = model.rope2d_freqs_grid[str(tuple(schedule))]  # [2, 1, 1, 1, L_padded, head_dim / 2]
    return table[:, 0, 0, 0, : sum(h * w for _, h, w in schedule)].numpy()


def alias_schedule_prefix(mods, model, schedule_hw, h_div_w):
    """Lets the official model run a prefix of an official schedule (not a key of its RoPE tables, which exist for the
    0.06M/0.25M/0.60M/1M schedules only) by pointing the prefix at the table of the 1M schedule of aspect ratio
    `h_div_w`, which every schedule of that ratio shares. As attention is block-causal, this equals truncating a run of
    the full schedule. Not official behaviour: a convenience for short tests."""
    schedule = _scale_schedule(schedule_hw)
    full = _scale_schedule(
        [(h, w) for _, h, w in mods.dynamic_resolution.dynamic_resolution_h_w[h_div_w]["1M"]["scales"]]
    )
    if full[: len(schedule)] != schedule:
        raise ValueError(f"{schedule_hw} is not a prefix of the h/w={h_div_w} schedule {full}")
    model.rope2d_freqs_grid.setdefault(str(tuple(schedule)), model.rope2d_freqs_grid[str(tuple(full))])


# ----------------------------------------------------------------------------------------------------------------------
# Self-check: the full-sequence forward and the KV-cached loop of the official model agree.


def _self_check(checkout):
    mods = load_official_infinity(checkout)
    bits, text_dim = 8, 256  # text_dim 32 is impossible: the text attention pool has text_dim // 128 heads
    model = build_official_infinity(
        mods, depth=2, embed_dim=64, num_heads=2, bits=bits, text_dim=text_dim, text_maxlen=16, block_chunks=2, seed=0
    )
    print(f"official Infinity: {sum(p.numel() for p in model.parameters())} parameters")
    rng = np.random.default_rng(0)
    text = rng.standard_normal((2, 5, text_dim))
    text_mask = np.array([[True] * 5, [True] * 3 + [False] * 2])
    text[~text_mask] = 1e3  # padding must not matter

    def run(schedule_hw, dtype=torch.float64):
        gt = [rng.integers(0, 2, (2, h, w, bits)) for h, w in schedule_hw]
        x = official_teacher_forced_inputs(gt, schedule_hw)
        full = split_by_scale(official_forward_logits(model, text, text_mask, x, schedule_hw, dtype), schedule_hw)
        cached = official_cached_logits(model, text, text_mask, gt, schedule_hw, dtype)
        return full, cached

    for name, h_div_w in (("1:1", 1.0), ("h/w 0.5", 0.5)):
        schedule_hw = [(h, w) for _, h, w in mods.dynamic_resolution.dynamic_resolution_h_w[h_div_w]["0.06M"]["scales"]]
        mods.flash_attn.calls.clear()
        full, cached = run(schedule_hw)
        print(f"{name} 0.06M schedule {schedule_hw} (L = {sum(h * w for h, w in schedule_hw)}), float64:")
        for (h, w), a, b in zip(schedule_hw, full, cached, strict=True):
            print(
                f"  scale {h}x{w}: max|forward - cached| = {np.abs(a - b).max():.2e}   (max|logit| {np.abs(a).max():.2f})"
            )
        print(f"  attention calls by dtype: {dict(mods.flash_attn.calls)}")

        torch.manual_seed(0)
        full32, cached32 = run(schedule_hw, torch.float32)
        print(f"  float32 (official bf16 cross-attention): max|forward - cached| = "
              f"{max(np.abs(a - b).max() for a, b in zip(full32, cached32, strict=True)):.2e}")  # fmt: skip

    schedule_hw = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)]
    gt = [rng.integers(0, 2, (2, h, w, bits)) for h, w in schedule_hw]
    x = official_teacher_forced_inputs(gt, schedule_hw)
    padded = official_forward_logits(model, text, text_mask, x, schedule_hw)
    model.pad_to_multiplier = 1
    unpadded = official_forward_logits(model, text, text_mask, x, schedule_hw)
    model.pad_to_multiplier = 128
    print(f"pad_to_multiplier 128 vs 1: max|difference| = {np.abs(padded - unpadded).max():.2e}")

    # A prefix run: the inputs depend on the last grid of the schedule (codes are summed on it), so a prefix has its own.
    prefix = schedule_hw[:4]
    alias_schedule_prefix(mods, model, prefix, 1.0)
    length = sum(h * w for h, w in prefix)
    truncated = official_forward_logits(model, text, text_mask, x[:, : length - 1], prefix)
    print(f"4-scale prefix {prefix}, inputs of the 7-scale schedule: max|prefix forward - full forward| = "
          f"{np.abs(truncated - padded[:, :length]).max():.2e}")  # fmt: skip
    x_prefix = official_teacher_forced_inputs(gt[:4], prefix)
    short = official_forward_logits(model, text, text_mask, x_prefix, prefix)
    cached = np.concatenate(official_cached_logits(model, text, text_mask, gt[:4], prefix), axis=1)
    print(f"4-scale prefix, its own inputs (max|difference of inputs| {np.abs(x_prefix - x[:, : length - 1]).max():.2f}): "
          f"max|forward - cached| = {np.abs(short - cached).max():.2e}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m tests.parity.official_infinity /path/to/Infinity  ({sys.argv[0]})")
    _self_check(sys.argv[1])
