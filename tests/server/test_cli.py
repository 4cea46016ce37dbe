"""The ``vera-serve`` commands besides ``serve``: train, export-peft, import-peft, merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from live import build_tiny_model
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.cli import main
from vera_core import VeraConfig, inject_vera
from vera_core.adapter_file import load_adapter
from vera_core.merge import merge


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Llama with the default model's tokenizer (so chat templates work)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def test_train_export_import_merge_round_trip(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Who am I?"},
                {"role": "assistant", "content": "You are Ada."},
            ]
        },
        {"prompt": "My cat is", "completion": " Tom."},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    flags = ["--model", str(tiny_dir), "--r", "8"]
    adapter_path = tmp_path / "ada.safetensors"
    assert (
        main(
            [
                "train",
                *flags,
                "--data",
                str(data),
                "--out",
                str(adapter_path),
                "--epochs",
                "2",
                "--lr",
                "0.1",
            ]
        )
        == 0
    )
    adapter = load_adapter(adapter_path)
    assert adapter.header.r == 8 and any(b.abs().sum() > 0 for _, b in adapter.vectors.values())

    peft_dir = tmp_path / "peft"
    assert main(["export-peft", *flags, str(adapter_path), "--out", str(peft_dir)]) == 0
    back = tmp_path / "back.safetensors"
    assert main(["import-peft", *flags, str(peft_dir), "--out", str(back)]) == 0
    again = load_adapter(back)
    for name, (d, b) in adapter.vectors.items():
        assert torch.equal(again.vectors[name][0], d) and torch.equal(again.vectors[name][1], b)

    merged_dir = tmp_path / "merged"
    assert main(["merge", *flags, str(adapter_path), "--out", str(merged_dir)]) == 0
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_dir)
        peft_logits = PeftModel.from_pretrained(base, peft_dir)(ids).logits
        vm = inject_vera(AutoModelForCausalLM.from_pretrained(tiny_dir), VeraConfig(r=8))
        merge(vm, adapter)
        ours = vm.model(ids).logits
    assert torch.allclose(merged, ours, atol=1e-5)
    assert torch.allclose(peft_logits, ours, atol=1e-5)


def test_train_reports_bad_data(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt here"}\n')
    code = main(
        [
            "train",
            "--model",
            str(tiny_dir),
            "--r",
            "8",
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "x.safetensors"),
        ]
    )
    assert code == 2 and "line 1: each example needs 'messages'" in capsys.readouterr().err
