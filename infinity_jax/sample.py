"""`python -m infinity_jax.sample` (`infinity-sample`): images from a converted official checkpoint or one of ours.

    # Infinity-2B from converted official files (python -m infinity_jax.convert …), 1024² and a 1:2 image:
    python -m infinity_jax.sample --transformer ckpt/infinity_2b --tokenizer ckpt/vae_d32reg --t5 ckpt/flan_t5_xl \\
        --t5_tokenizer google/flan-t5-xl --prompt "a ringed planet, 3d render" --ratio 1.0 --res 1M \\
        --cfg 3 --tau 0.5 --top_p 0.97 --seed 0 --out samples/ --strip
    # a training run of ours (its tokenizer and T5 come from the run's config):
    python -m infinity_jax.sample --run runs/tiny --prompts prompts.txt --batch 4 --out samples/
    # VAR, class-conditional (ImageNet ids), and zero-shot in-painting of a box:
    python -m infinity_jax.sample --transformer ckpt/var_d16 --tokenizer ckpt/var_vae --class_id 207 --class_id 88
    python -m infinity_jax.sample --transformer ckpt/var_d16 --tokenizer ckpt/var_vae --class_id 207 \\
        --edit photo.png --box 0.25,0.25,0.75,0.75

Writes `sample_000.png`, … (and `strip_000.png`, the image after each scale, with --strip), `grid.png`, and prints
the time per image. Editing (`--edit IMAGE` with `--mask MASK.png`, white = regenerate, or `--box y0,x0,y1,x1`
in [0, 1], `--outpaint` to regenerate outside it) teacher-forces the kept region's tokens at every scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from infinity_jax import editing, images, quantizer, schedules
from infinity_jax.convert import converted
from infinity_jax.generate import for_inference, generate, on_scale
from infinity_jax.generate_var import generate_var
from infinity_jax.models.t5 import T5Config, T5Encoder, get_t5_layout
from infinity_jax.models.transformer import TransformerConfig
from infinity_jax.models.vqvae import VQVAES, VQTokenizer
from infinity_jax.ops.patchify import pixel_shuffle
from infinity_jax.schedules import Schedule
from infinity_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class TextEncoder:
    """The frozen T5 on device and its tokenizer on the host."""

    params: Any
    config: T5Config
    tokenizer: Any

    def __call__(self, prompts: list[str], max_length: int):
        """prompts -> (features [N, T, C] float32, mask [N, T] bool), T = the longest prompt rounded up to 16."""
        from infinity_jax.text import tokenize

        tokens, mask = tokenize(self.tokenizer, prompts, max_length)
        length = min(max_length, -(-int(mask.sum(1).max()) // 16) * 16)  # fewer distinct shapes, fewer compiles
        tokens, mask = tokens[:, :length], mask[:, :length]
        return _encode(self.params, self.config, tokens, mask), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=1)
def _encode(params, config, tokens, mask):
    return T5Encoder(config, jnp.bfloat16).apply({"params": params}, tokens, mask)


@dataclasses.dataclass
class Sampler:
    """A transformer with its tokenizer (and T5 for text models): `sample` draws one batch."""

    config: TransformerConfig
    params: Any
    tokenizer: Tokenizer | VQTokenizer
    text: TextEncoder | None = None
    resolution: Any = "0.06M"  # Infinity: "0.06M" … "1M"; VAR: its image size

    @property
    def is_var(self) -> bool:
        return bool(self.config.vocab)

    def schedule(self, ratio: float = 1.0) -> Schedule:
        if self.is_var:
            if ratio != 1.0:
                raise ValueError("VAR generates square images only (--ratio 1)")
            return schedules.var_schedule(self.resolution)
        return schedules.infinity_schedule(schedules.nearest_template(ratio), self.resolution)

    def sample(self, key, *, prompts=(), negative=None, class_ids=(), ratio=1.0, cfg=3.0, tau=1.0, top_k=0,
               top_p=0.0, edit=None, keep=None, progress=False):  # fmt: skip
        """One batch -> (images uint8 [B, H, W, 3], tokens per scale, the schedule).

        edit: [B, H, W, 3] in [-1, 1] at the schedule's pixel size; keep: [B, H, W] (1 = keep `edit` there).
        """
        schedule = self.schedule(ratio)
        known = {}
        if edit is not None:
            masks = editing.scale_masks(jnp.asarray(keep), schedule)
            tokens = self.tokenizer.tokenize(jnp.asarray(edit), schedule)
            known = {"known_masks": masks, ("known_indices" if self.is_var else "known_bits"): tokens}
        if self.is_var:
            labels = np.asarray(class_ids, np.int32)
            out = generate_var(self.params, self.config, self.tokenizer, schedule, key, labels=labels, cfg=cfg,
                               tau=tau, top_k=top_k, top_p=top_p, progress=progress, **known)  # fmt: skip
            return images.from_unit(out.images), out.indices, schedule
        cond = self._conditioning(list(prompts), class_ids, negative)
        out = generate(self.params, self.config, schedule, key, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p,
                       tokenizer=self.tokenizer, progress=progress, **cond, **known)  # fmt: skip
        return images.from_unit(out.images), out.bits, schedule

    def _conditioning(self, prompts, class_ids, negative) -> dict:
        if self.config.cond == "class":
            return {"labels": np.asarray(class_ids, np.int32)}
        if self.text is None:
            raise ValueError("a text-conditional model needs a T5 encoder (--t5) and its tokenizer (--t5_tokenizer)")
        text, mask = self.text(prompts, self.config.text_maxlen)
        cond = {"text": text, "text_mask": mask}
        if negative is not None:
            cond["negative_text"], cond["negative_mask"] = self.text([negative] * len(prompts), self.config.text_maxlen)
        return cond

    def progression(self, tokens, schedule: Schedule) -> np.ndarray:
        """Tokens per scale -> uint8 [K, B, H, W, 3]: the image decoded after each scale (coarse to fine)."""
        return images.from_unit(_progression(self.tokenizer, tuple(tokens), schedule))


@functools.partial(jax.jit, static_argnums=2)
def _progression(tokenizer, tokens, schedule: Schedule):
    """The latent after each scale, all decoded in one batch -> [K, B, H, W, 3]."""
    batch = tokens[0].shape[0]
    if isinstance(tokenizer, VQTokenizer):
        f_hat, latents = jnp.zeros((batch, *schedule.grid, tokenizer.config.dim), jnp.float32), []
        for k, idx in enumerate(tokens):
            f_hat = tokenizer.add_scale(f_hat, tokenizer.lookup(idx), k, schedule)
            latents.append(f_hat)
        decode = tokenizer.decode
    else:
        bits = [pixel_shuffle(b) for b in tokens] if tokenizer.config.patchify else list(tokens)
        grid = tokenizer.latent_schedule(schedule).grid
        latents = [quantizer.bits_to_latent(bits[: k + 1], grid) for k in range(len(bits))]
        decode = tokenizer.decode_latent
    decoded = decode(jnp.concatenate(latents))
    return decoded.reshape(len(tokens), batch, *decoded.shape[1:])


# -- loading ---------------------------------------------------------------------------------------------------------


def _random(spec: str, what: str) -> str | None:
    """ "random:NAME" -> NAME (random weights of a named layout, for smoke runs); None for other sources."""
    if not spec.startswith("random:"):
        return None
    name = spec.split(":", 1)[1]
    if not name:
        raise ValueError(f"--{what} random:NAME needs a layout name")
    return name


def load_tokenizer(spec: str, seed: int = 0):
    """A converted tokenizer or VQ-VAE folder, an official .pth (BSQ-VAE), or random:NAME."""
    name = _random(spec, "tokenizer")
    if name is not None:
        kind = "vqvae" if name in VQVAES else "tokenizer"
        layout, params = converted.random_params(kind, name, seed)
        return (VQTokenizer if kind == "vqvae" else Tokenizer)(params, layout)
    if os.path.isdir(spec):
        loaded = converted.load(spec)
        if loaded.kind == "vqvae":
            return VQTokenizer(_float32(loaded.params), loaded.layout)
        if loaded.kind == "tokenizer":
            return Tokenizer(_float32(loaded.params), loaded.layout)
        raise ValueError(f"{spec} holds a converted {loaded.kind}, not a tokenizer")
    from infinity_jax.convert import common
    from infinity_jax.convert import tokenizer as convert_tokenizer

    state = common.read_state_dict(spec, containers=("vae",))
    layout = convert_tokenizer.infer_layout(state)
    return Tokenizer(convert_tokenizer.convert_state_dict(state, layout), layout)


def load_text(spec: str, tokenizer_spec: str, seed: int = 0) -> TextEncoder:
    """T5: a converted folder, a Hugging Face folder or hub name, or random:NAME; its tokenizer: a tokenizer.json,
    a folder or a hub name (default: the T5 source)."""
    from transformers import AutoTokenizer

    from infinity_jax.convert import t5 as convert_t5
    from infinity_jax.text import load_text_tokenizer

    name = _random(spec, "t5")
    if name is not None:
        config, params = converted.random_params("t5", name, seed + 1)
    elif os.path.isdir(os.path.join(spec, "params")):
        loaded = converted.load(spec)
        params, config = loaded.params, loaded.layout
    else:
        params, config = convert_t5.load_pretrained(spec)
    tokenizer_spec = tokenizer_spec or spec
    if os.path.exists(tokenizer_spec):
        host_tokenizer = load_text_tokenizer(tokenizer_spec)
    else:
        host_tokenizer = AutoTokenizer.from_pretrained(tokenizer_spec)
    return TextEncoder(jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params), config, host_tokenizer)


def _float32(params):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def load_run(workdir: str):
    """(model config, params, the run's config) of the newest checkpoint of a training run of ours."""
    import ml_collections
    import orbax.checkpoint as ocp

    from infinity_jax.train.trainer import transformer_config

    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore())
    )
    manager.close()
    config = ml_collections.ConfigDict(restored.config)
    return transformer_config(config), restored.state["params"], config


PRECISIONS = {"bf16": "bfloat16", "fp32": "float32"}


def build(args) -> Sampler:
    """The Sampler that the command-line arguments describe, its blocks in --precision."""
    sampler = _build(args)
    precision = args.precision
    if precision == "auto":  # CPUs have no fast bf16 matmuls; GPUs and TPUs run the blocks as the official sampler
        precision = "fp32" if jax.default_backend() == "cpu" else "bf16"
    params, config = sampler.params, dataclasses.replace(sampler.config, dtype=PRECISIONS[precision])
    if args.blocks != "as_stored":
        scanned = args.blocks == "scanned"
        params = converted.relayout(params, scanned, config.depth)
        config = dataclasses.replace(config, scan_blocks=scanned)
    params, config = for_inference(params, config)
    return dataclasses.replace(sampler, config=config, params=params)


def _build(args) -> Sampler:
    if args.run:
        from infinity_jax.train import frozen

        model, params, run = load_run(args.run)

        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else frozen.load_tokenizer(run, mesh, ())
        text = None
        if model.cond == "text":
            if args.t5:
                text = load_text(args.t5, args.t5_tokenizer)
            else:
                from infinity_jax.text import load_text_tokenizer, tokenizer_path

                t5_params = frozen.load_text_encoder(run, mesh, ())
                host = load_text_tokenizer(args.t5_tokenizer or tokenizer_path(run))
                text = TextEncoder(t5_params, get_t5_layout(run.text.layout), host)
        return Sampler(model, params, tokenizer, text, args.res or run.schedule.resolution)
    if not args.transformer or not args.tokenizer:
        raise ValueError("give --run DIR, or --transformer and --tokenizer (and --t5 for text models)")
    loaded = converted.load(args.transformer)
    if loaded.kind != "transformer":
        raise ValueError(f"{args.transformer} holds a converted {loaded.kind}, not a transformer")
    tokenizer = load_tokenizer(args.tokenizer)
    text = load_text(args.t5, args.t5_tokenizer) if loaded.layout.cond == "text" and args.t5 else None
    if loaded.layout.vocab:
        resolution = args.res or (loaded.schedule.name.removeprefix("var@") if loaded.schedule else "256")
        resolution = int(resolution) if str(resolution).isdigit() else tuple(h for h, _ in loaded.schedule.scales)
    else:
        resolution = args.res or "1M"
    return Sampler(loaded.layout, _float32(loaded.params), tokenizer, text, resolution)


# -- the command -----------------------------------------------------------------------------------------------------


def _floats(text: str) -> float | list[float]:
    values = [float(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def _keep_mask(args, size: tuple[int, int]) -> np.ndarray:
    """[H, W] float32, 1 where the edited image is kept."""
    if args.mask:
        regenerate = np.asarray(Image.open(args.mask).convert("L").resize(size[::-1], Image.NEAREST)) > 127
        return (~regenerate).astype(np.float32)
    if not args.box:
        raise ValueError("--edit needs --mask MASK.png (white = regenerate) or --box y0,x0,y1,x1")
    y0, x0, y1, x1 = (float(v) for v in args.box.split(","))
    keep = np.ones(size, np.float32)
    keep[round(y0 * size[0]) : round(y1 * size[0]), round(x0 * size[1]) : round(x1 * size[1])] = 0.0
    return 1.0 - keep if args.outpaint else keep


def _grid(batch_images: list[np.ndarray]) -> np.ndarray:
    """Images of one shape side by side in rows of at most 8."""
    stacked = np.stack(batch_images)
    n, h, w, _ = stacked.shape
    cols = min(n, 8)
    rows = -(-n // cols)
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, image in enumerate(stacked):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = image
    return grid


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="infinity-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_argument_group("models")
    source.add_argument("--run", help="a training workdir of ours (its newest checkpoint and its frozen towers)")
    source.add_argument("--transformer", help="a converted transformer (python -m infinity_jax.convert)")
    source.add_argument("--tokenizer", help="a converted tokenizer / VQ-VAE, an official .pth, or random:NAME")
    source.add_argument("--t5", help="a converted T5, a Hugging Face folder or hub name, or random:NAME")
    source.add_argument("--t5_tokenizer", help="tokenizer.json, folder or hub name (default: --t5)")
    what = parser.add_argument_group("what to draw")
    what.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    what.add_argument("--prompts", help="a file of captions, one per line")
    what.add_argument("--negative", help="negative prompt (the unconditional branch)")
    what.add_argument("--class_id", type=int, action="append", default=[], help="a class id (repeatable)")
    what.add_argument("--ratio", type=float, default=1.0, help="h/w; the nearest aspect-ratio template is used")
    what.add_argument("--size", help="HxW in pixels: picks the nearest template (and --res if not given)")
    what.add_argument("--res", help="Infinity: 0.06M, 0.25M, 0.60M or 1M; VAR: 256 or 512")
    how = parser.add_argument_group("sampling")
    how.add_argument("--cfg", type=_floats, default=3.0, help="guidance (VAR: its ramp's scale), or one per scale")
    how.add_argument("--tau", type=_floats, default=1.0, help="temperature, or one per scale")
    how.add_argument("--top_k", type=int, default=0)
    how.add_argument("--top_p", type=float, default=0.0)
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--batch", type=int, default=4)
    how.add_argument(
        "--precision",
        choices=["auto", *sorted(PRECISIONS)],
        default="auto",
        help="the blocks' weights and matmuls (bf16: as the official sampler; the rest stays fp32); "
        "auto: bf16 on GPUs and TPUs, fp32 on CPUs",
    )
    how.add_argument(
        "--blocks",
        choices=["as_stored", "scanned", "unrolled"],
        default="as_stored",
        help="the blocks as one scanned layer (fast to compile) or unrolled (each layer's weights and KV cache its "
        "own: ~10 %% faster generation on a GPU after a ~4x longer first compile, see benchmarks/RESULTS.md)",
    )
    edit = parser.add_argument_group("zero-shot editing")
    edit.add_argument("--edit", help="an image to edit (in-/out-painting, or class-conditional editing with VAR)")
    edit.add_argument("--mask", help="a mask image: white = regenerate")
    edit.add_argument("--box", help="y0,x0,y1,x1 in [0, 1]: the region to regenerate")
    edit.add_argument("--outpaint", action="store_true", help="regenerate outside --box instead")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="samples", help="output folder")
    out.add_argument("--strip", action="store_true", help="also write the image after each scale")
    return parser.parse_args(argv)


def _size_to_ratio_and_res(size: str, is_var: bool) -> tuple[float, str | None]:
    height, width = (int(v) for v in size.lower().split("x"))
    if is_var:
        return 1.0, str(max(height, width))
    pixels = {r: np.prod(schedules.infinity_schedule(1.0, r).pixel_size) for r in ("0.06M", "0.25M", "0.60M", "1M")}
    return height / width, min(pixels, key=lambda r: abs(np.log(pixels[r] / (height * width))))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sampler = build(args)
        if args.size:
            args.ratio, res = _size_to_ratio_and_res(args.size, sampler.is_var)
            if not args.res:
                sampler.resolution = int(res) if sampler.is_var else res
        run(sampler, args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def run(sampler: Sampler, args) -> list[str]:
    """Draws every prompt/class of `args` in batches; writes the PNGs; returns their paths."""
    items = list(args.prompt)
    if args.prompts:
        with open(args.prompts) as f:
            items += [line.strip() for line in f if line.strip()]
    if sampler.config.cond == "class":
        items = list(args.class_id)
        if not items:
            raise ValueError("a class-conditional model needs --class_id")
    elif not items:
        raise ValueError("a text-conditional model needs --prompt or --prompts")
    schedule = sampler.schedule(args.ratio)
    edit = keep = None
    if args.edit:
        edit = images.load_for(args.edit, schedule.pixel_size)
        keep = _keep_mask(args, schedule.pixel_size)
    os.makedirs(args.out, exist_ok=True)
    written, drawn = [], []
    print(f"{schedule.name}: {schedule.num_scales} scales, {schedule.num_tokens} tokens, "
          f"{schedule.pixel_size[0]}x{schedule.pixel_size[1]} pixels")  # fmt: skip
    for start in range(0, len(items), args.batch):
        chunk = items[start : start + args.batch]
        count = len(chunk)
        chunk = chunk + [chunk[-1]] * (args.batch - count)  # a full last batch: one compiled shape for all
        kwargs = {"class_ids": chunk} if sampler.config.cond == "class" else {"prompts": chunk}
        if edit is not None:
            kwargs.update(edit=np.repeat(edit[None], len(chunk), 0), keep=np.repeat(keep[None], len(chunk), 0))
        began = time.perf_counter()
        with tqdm(total=schedule.num_scales, desc="scales", unit="scale", leave=False) as bar:
            with on_scale(lambda _k, bar=bar: bar.update(1)):
                pixels, tokens, schedule = sampler.sample(
                    jax.random.fold_in(jax.random.key(args.seed), start), negative=args.negative, ratio=args.ratio,
                    cfg=args.cfg, tau=args.tau, top_k=args.top_k, top_p=args.top_p, progress=True, **kwargs,
                )  # fmt: skip
                pixels = np.asarray(jax.block_until_ready(pixels))
        took = time.perf_counter() - began
        note = " (incl. compilation)" if start == 0 else ""
        print(f"batch {start // args.batch}: {took / len(chunk):.3f} s per image{note}")
        frames = sampler.progression(tokens, schedule) if args.strip else None
        for i, image in enumerate(pixels[:count]):
            index = start + i
            written.append(images.save_png(image, os.path.join(args.out, f"sample_{index:03d}.png")))
            if frames is not None:
                strip = np.concatenate(list(frames[:, i]), axis=1)
                written.append(images.save_png(strip, os.path.join(args.out, f"strip_{index:03d}.png")))
            drawn.append(image)
    written.append(images.save_png(_grid(drawn), os.path.join(args.out, "grid.png")))
    print(f"wrote {len(written)} files to {args.out}")
    return written


def console_main():
    sys.exit(main())


if __name__ == "__main__":
    console_main()
