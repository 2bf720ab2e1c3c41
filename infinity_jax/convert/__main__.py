"""`python -m infinity_jax.convert`: official checkpoints -> converted orbax checkpoints, and back.

    python -m infinity_jax.convert transformer infinity_2b_reg.pth ckpt/infinity_2b   [--dtype bfloat16]
    python -m infinity_jax.convert transformer infinity_8b_weights/ ckpt/infinity_8b     (a folder of shards)
    python -m infinity_jax.convert tokenizer infinity_vae_d32reg.pth ckpt/vae_d32reg
    python -m infinity_jax.convert t5 google/flan-t5-xl ckpt/flan_t5_xl                  (or a local HF folder)
    python -m infinity_jax.convert var var_d16.pth ckpt/var_d16                          (a VAR transformer …)
    python -m infinity_jax.convert var vae_ch160v4096z32.pth ckpt/var_vae                (… or its VQ-VAE)
    python -m infinity_jax.convert export ckpt/infinity_2b infinity_2b_ours.pth [--block_chunks 8]
    python -m infinity_jax.convert random transformer:tiny:bits=16,text_dim=256 ckpt/tiny   (random weights of a
        named layout, fields overridable: smoke tests, notebooks; also tokenizer:NAME, t5:NAME, vqvae:NAME)

The layout is read off the state dict (widths, depth, heads, bits, …), so no size needs naming; every name and
shape is checked and a mismatch fails listing every missing, unexpected and misshapen tensor. The output folder
(`converted.py`) is what `train.init_from`, `tokenizer.checkpoint` and `text.checkpoint` read. `export` writes a
converted checkpoint (or one exported from a run) back as an official state dict (.pth, or .safetensors).
"""

from __future__ import annotations

import argparse
import sys

from infinity_jax.convert import common, converted
from infinity_jax.convert import t5 as convert_t5
from infinity_jax.convert import tokenizer as convert_tokenizer
from infinity_jax.convert import transformer as convert_transformer
from infinity_jax.convert import vqvae as convert_vqvae
from infinity_jax.schedules import var_schedule


def convert_transformer_state(state, src: str, out: str, dtype: str, scan_blocks: bool) -> str:
    config = convert_transformer.infer_config(state, scan_blocks=scan_blocks)
    params = convert_transformer.convert_state_dict(state, config)
    resolution = convert_transformer.var_resolution(state, config) if config.vocab else None
    converted.save(out, "transformer", config, params, source=src, dtype=dtype, resolution=resolution)
    family = "VAR" if config.vocab else "Infinity"
    return f"{family} transformer: depth {config.depth}, width {config.embed_dim}, {config.num_heads} heads"


def convert_tokenizer_file(src: str, out: str, dtype: str, use_ema: bool) -> str:
    state = common.read_state_dict(src, containers=("ema",) if use_ema else ("vae",))
    layout = convert_tokenizer.infer_layout(state)
    params = convert_tokenizer.convert_state_dict(state, layout)
    converted.save(out, "tokenizer", layout, params, source=src, dtype=dtype)
    return f"BSQ-VAE tokenizer {convert_tokenizer.layout_name(layout, src)}: d={layout.bits}, stride {layout.stride}"


def convert_vqvae_state(state, src: str, out: str, dtype: str) -> str:
    config = convert_vqvae.infer_config(state)
    converted.save(out, "vqvae", config, convert_vqvae.convert_state_dict(state, config), source=src, dtype=dtype)
    return f"VQ-VAE: V={config.vocab}, Cvae={config.dim}, {config.layout.base_ch} channels"


def convert_var_file(src: str, out: str, dtype: str, scan_blocks: bool) -> str:
    """VAR releases two files: the transformer (var_d*.pth) and the VQ-VAE; which one is told by its names."""
    state = common.read_state_dict(src)
    if "quantize.embedding.weight" in state:
        return convert_vqvae_state(state, src, out, dtype)
    if "pos_1LC" not in state:
        raise ValueError(f"{src} is neither a VAR transformer (pos_1LC) nor a VAR VQ-VAE (quantize.embedding.weight)")
    return convert_transformer_state(state, src, out, dtype, scan_blocks)


def export(path: str, out: str, block_chunks: int | None) -> str:
    loaded = converted.load(path)
    layout, params = loaded.layout, loaded.params
    if loaded.kind == "transformer":
        chunks = block_chunks or 1
        state = convert_transformer.export_state_dict(params, layout, chunks, loaded.schedule)
    elif loaded.kind == "tokenizer":
        state = convert_tokenizer.export_state_dict(params, layout)
    elif loaded.kind == "t5":
        state = convert_t5.export_state_dict(params, layout)
    else:
        state = convert_vqvae.export_state_dict(params, layout, var_schedule(256))
    common.save_state_dict(state, out)
    return f"{len(state)} tensors under the official names"


def _overrides(text: str) -> dict:
    """ "a=1,b=true,c=x" -> {"a": 1, "b": True, "c": "x"}."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def random_checkpoint(spec: str, out: str, seed: int, resolution) -> str:
    """Writes random weights of "KIND:NAME[:field=value,…]" as a converted checkpoint."""
    kind, _, rest = spec.partition(":")
    name, _, fields = rest.partition(":")
    resolution = resolution or 256
    if isinstance(resolution, str):  # "512", or VAR patch_nums "1,2,3,4"
        resolution = int(resolution) if resolution.isdigit() else [int(p) for p in resolution.split(",")]
    layout, params = converted.random_params(kind, name, seed, _overrides(fields), resolution)
    var = kind == "transformer" and layout.vocab
    converted.save(out, kind, layout, params, source=spec, resolution=resolution if var else None)
    return f"random {name} {kind}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infinity_jax.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=("transformer", "tokenizer", "t5", "var", "export", "random"))
    parser.add_argument("src", help="official file or folder (export: a converted checkpoint folder)")
    parser.add_argument("out", help="output folder (export: a .pth or .safetensors file)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="stored parameter dtype")
    parser.add_argument(
        "--scan_blocks", default=True, action=argparse.BooleanOptionalAction,
        help="store transformer blocks stacked for nn.scan (the trainer's default for every size but tiny)",
    )  # fmt: skip
    parser.add_argument("--ema", action="store_true", help="tokenizer: take the file's EMA weights")
    parser.add_argument("--block_chunks", type=int, help="export: write blocks as block_chunks.{c}.module.{j}")
    parser.add_argument("--seed", type=int, default=0, help="random: the init seed")
    parser.add_argument("--res", help="random VAR transformers: image size (256) or patch_nums (1,2,3,4)")
    args = parser.parse_args(argv)
    try:
        if args.kind == "transformer":
            state = common.read_state_dict(args.src, containers=("trainer", "gpt_fsdp"))
            summary = convert_transformer_state(state, args.src, args.out, args.dtype, args.scan_blocks)
        elif args.kind == "tokenizer":
            summary = convert_tokenizer_file(args.src, args.out, args.dtype, args.ema)
        elif args.kind == "t5":
            params, config = convert_t5.load_pretrained(args.src)
            converted.save(args.out, "t5", config, params, source=args.src, dtype=args.dtype)
            summary = f"T5 encoder: {config.num_layers} layers, width {config.d_model}"
        elif args.kind == "var":
            summary = convert_var_file(args.src, args.out, args.dtype, args.scan_blocks)
        elif args.kind == "random":
            summary = random_checkpoint(args.src, args.out, args.seed, args.res)
        else:
            summary = export(args.src, args.out, args.block_chunks)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.src} -> {args.out}: {summary}")
    return 0


def console_main():
    sys.exit(main())


if __name__ == "__main__":
    console_main()
