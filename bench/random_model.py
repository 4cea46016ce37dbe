"""An HF model directory of random weights in the shapes of another's, for throughput runs on a
machine that cannot fetch the real weights (speed depends on shapes, not values):

    python bench/random_model.py FILES_DIR OUT_DIR

``FILES_DIR`` holds ``config.json`` and the tokenizer files (no weights); ``OUT_DIR`` gets them
and a ``model.safetensors`` of the model's own initialization (seeded).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main(files: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in files.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(files, local_files_only=True)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # init where fast
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    print(f"random {config.model_type} weights ({model.num_parameters() / 1e6:.0f} M) in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
