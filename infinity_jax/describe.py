"""Prints a resolved config with what it implies: parameter count and the token schedule of every template.

    python -m infinity_jax.describe --config configs/infinity.py:size=infinity_2b,res=1M
    python -m infinity_jax.describe --config configs/var.py:size=d30,res=512 --config.model.drop_path=0.2

A quick way for a scaling team to see what a size costs before launching it; the same `--config` flags work for
every entry point of the project.
"""

from __future__ import annotations

from infinity_jax import cli, schedules
from infinity_jax import config as config_lib
from infinity_jax.models import sizes


def summary(config) -> str:
    """Human-readable lines: the config, the analytic parameter count, tokens per schedule."""
    config_lib.validate(config)
    model = config.model
    layout = sizes.TransformerSize(**{f: model[f] for f in config_lib.LAYOUT_FIELDS})
    lines = [str(config).rstrip(), ""]
    if model.family == "infinity":
        params = sizes.count_params(layout, bits=model.bits, text_dim=model.text_dim, text_maxlen=model.text_maxlen)
        lines.append(f"parameters: {params:,} (analytic, official layout)")
        lines.append(f"schedules at {config.schedule.resolution}: template -> pixels, scales, tokens")
        for template in config_lib.templates(config):
            s = schedules.infinity_schedule(template, config.schedule.resolution)
            lines.append(f"  {template:>6}: {s.pixel_size[0]}x{s.pixel_size[1]}, K={s.num_scales}, L={s.num_tokens}")
    else:
        s = schedules.var_schedule(config.schedule.resolution)
        params = sizes.count_params(layout, num_tokens=s.num_tokens, num_scales=s.num_scales)
        lines.append(f"parameters: {params:,} (analytic, official layout)")
        lines.append(f"schedule {s.name}: patch_nums {[h for h, _ in s.scales]}, L={s.num_tokens}")
    return "\n".join(lines)


def main(config):
    print(summary(config))


if __name__ == "__main__":
    cli.run(main)
