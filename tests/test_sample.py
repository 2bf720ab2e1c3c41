"""`python -m infinity_jax.sample` on tiny random converted checkpoints: files, sizes, byte-for-byte determinism,
per-scale guidance, the coarse-to-fine strip, VAR's class-conditional path, and zero-shot editing keeping the known
tokens exactly."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from infinity_jax import editing, images, schedules
from infinity_jax.convert.__main__ import main as convert
from infinity_jax.sample import build, main, parse_args

TOKENIZER = "tests/assets/t5_tokenizer/tokenizer.json"
EMOJI = "tests/assets/emoji3d/1fa90.webp"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    specs = {
        "infinity": "transformer:tiny:bits=16,text_dim=256,text_maxlen=32",
        "tokenizer": "tokenizer:tiny",
        "t5": "t5:tiny",
        "var": "transformer:var_tiny:bits=8,vocab=64",
        "vqvae": "vqvae:tiny",
    }
    for name, spec in specs.items():  # VAR on the 4-scale 64² schedule (1, 2, 3, 4): quick on a CPU
        assert convert(["random", spec, str(root / name), "--res", "1,2,3,4"]) == 0
    return root


def _text_args(ckpt, out, *extra):
    return [
        "--transformer", str(ckpt / "infinity"), "--tokenizer", str(ckpt / "tokenizer"), "--t5", str(ckpt / "t5"),
        "--t5_tokenizer", TOKENIZER, "--out", str(out), *extra,
    ]  # fmt: skip


def test_text_to_image_files_sizes_and_determinism(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red planet\n\nan orange cat with a very long caption that is longer than the others\n")
    common = ["--prompt", "a ringed planet", "--prompts", str(prompts), "--ratio", "0.5", "--res", "0.06M",
              "--batch", "2", "--cfg", "3", "--tau", "0.5", "--top_p", "0.97", "--negative", "blurry", "--strip"]  # fmt: skip
    assert main(_text_args(ckpt, tmp_path / "a", *common, "--seed", "1")) == 0
    assert main(_text_args(ckpt, tmp_path / "b", *common, "--seed", "1")) == 0
    assert main(_text_args(ckpt, tmp_path / "c", *common, "--seed", "2")) == 0
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["grid.png"] + [f"{k}_{i:03d}.png" for k in ("sample", "strip") for i in range(3)]
    schedule = schedules.infinity_schedule(0.5, "0.06M")  # 176×352 pixels, 7 scales
    height, width = schedule.pixel_size
    assert Image.open(tmp_path / "a" / "sample_002.png").size == (width, height)
    assert Image.open(tmp_path / "a" / "strip_000.png").size == (width * schedule.num_scales, height)
    assert Image.open(tmp_path / "a" / "grid.png").size == (3 * width, height)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "sample_000.png").read_bytes() != (tmp_path / "c" / "sample_000.png").read_bytes()
    # The strip's last panel is the sample itself, decoded in another batch: XLA's convolutions may sum in another
    # order there, which moves a pixel that lies on a rounding boundary by one level.
    strip = np.asarray(Image.open(tmp_path / "a" / "strip_001.png"), np.int16)
    diff = np.abs(strip[:, -width:] - np.asarray(Image.open(tmp_path / "a" / "sample_001.png"), np.int16))
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3, (diff.max(), np.mean(diff > 0))


def test_size_flag_per_scale_cfg_and_clear_errors(ckpt, tmp_path, capsys):
    cfg = ",".join(["1"] * 3 + ["4"] * 4)  # guidance from the fourth of 7 scales on
    assert main(_text_args(ckpt, tmp_path, "--prompt", "x", "--size", "250x260", "--cfg", cfg, "--batch", "1")) == 0
    assert Image.open(tmp_path / "sample_000.png").size == (256, 256)  # 1:1 template, 0.06M
    assert main(_text_args(ckpt, tmp_path, "--prompt", "x", "--res", "0.06M", "--cfg", "1,2")) == 1
    assert "cfg must be a number or a list of 7" in capsys.readouterr().err
    assert main(["--transformer", str(ckpt / "infinity"), "--prompt", "x"]) == 1
    assert "--tokenizer" in capsys.readouterr().err


def test_unrolled_blocks_draw_the_same_images(ckpt, tmp_path):
    common = ["--prompt", "a ringed planet", "--res", "0.06M", "--batch", "1", "--cfg", "3", "--top_p", "0.9"]
    unrolled = build(parse_args(_text_args(ckpt, tmp_path, *common, "--blocks", "unrolled")))
    assert not unrolled.config.scan_blocks and "block_1" in unrolled.params["blocks"]  # stored scanned
    for blocks in ("as_stored", "unrolled"):
        assert main(_text_args(ckpt, tmp_path / blocks, *common, "--blocks", blocks)) == 0
    scanned, looped = (
        np.asarray(Image.open(tmp_path / b / "sample_000.png"), float) for b in ("as_stored", "unrolled")
    )
    assert np.abs(scanned - looped).mean() < 1.0, np.abs(scanned - looped).mean()  # a rounding-level bit flip at most


def test_var_class_conditional(ckpt, tmp_path):
    args = ["--transformer", str(ckpt / "var"), "--tokenizer", str(ckpt / "vqvae"), "--out", str(tmp_path)]
    assert main([*args, "--class_id", "3", "--class_id", "7", "--cfg", "1.5", "--top_k", "20", "--top_p", "0.9"]) == 0
    assert Image.open(tmp_path / "sample_001.png").size == (64, 64)
    assert main([*args, "--prompt", "a cat"]) == 1  # class models need --class_id
    assert main([*args, "--class_id", "3", "--edit", EMOJI, "--box", "0.25,0.25,0.75,0.75", "--outpaint"]) == 0


@pytest.mark.parametrize("model", ["infinity", "var"])
def test_editing_keeps_the_known_tokens_exactly(ckpt, tmp_path, model):
    extra = ["--t5", str(ckpt / "t5"), "--t5_tokenizer", TOKENIZER, "--res", "0.06M"] if model == "infinity" else []
    tokenizer = "tokenizer" if model == "infinity" else "vqvae"
    args = parse_args(["--transformer", str(ckpt / model), "--tokenizer", str(ckpt / tokenizer), *extra])
    sampler = build(args)
    schedule = sampler.schedule(1.0)
    photo = images.load_for(EMOJI, schedule.pixel_size)[None]
    keep = np.ones((1, *schedule.pixel_size), np.float32)
    size = schedule.pixel_size[0]
    keep[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 0.0  # regenerate the centre
    cond = {"prompts": ["a ringed planet"]} if model == "infinity" else {"class_ids": [3]}
    pixels, tokens, _ = sampler.sample(jax.random.key(0), edit=photo, keep=keep, cfg=2.0, **cond)
    given = sampler.tokenizer.tokenize(photo, schedule)
    masks = editing.scale_masks(keep, schedule)
    kept = 0
    for ours, theirs, mask in zip(tokens, given, masks, strict=True):
        mask = np.asarray(mask)
        np.testing.assert_array_equal(np.asarray(ours)[mask], np.asarray(theirs)[mask])
        kept += int(mask.sum())
    assert 0 < kept < sum(schedule.tokens_per_scale)  # some kept, some generated
    grid = schedule.grid[0]
    centre = slice(grid // 4 + 1, 3 * grid // 4 - 1)
    assert not np.asarray(masks[-1])[0, centre, centre].any() and np.asarray(masks[-1])[0, 0].all()
    free, _, _ = sampler.sample(jax.random.key(0), cfg=2.0, **cond)
    assert pixels.shape == free.shape == (1, *schedule.pixel_size, 3)
