"""The examples and the CLI run as a user would run them, and print what they promise."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 240) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_compiled_model_example():
    out = run("examples/compiled_model.py")
    assert out.strip().splitlines()[-1] == "OK", out
    assert "graphs compiled: 1" in out


def test_cuda_graphs_example():
    out = run("examples/cuda_graphs.py")
    assert "max |runner - eager| over 4 steps" in out, out


def test_generate_example():
    out = run("examples/generate.py", "--num-prompts", "4", "--max-new-tokens", "12")
    assert "batched == one at a time: True" in out, out
    assert "tokens/s" in out


def test_generate_example_from_local_hf_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    out = run("examples/generate.py", "--hf", str(tmp_path), "--num-prompts", "3", "--max-new-tokens", "6")
    assert "batched == one at a time: True" in out, out


def test_cli_info():
    out = run("-m", "compiled_attn", "info")
    assert "torch" in out and "reference" in out and "selected" in out
    assert "prefill kernel of triton/trtllm:" in out, out


def test_cli_generate():
    out = run("-m", "compiled_attn", "generate", "--num-prompts", "3", "--max-new-tokens", "5", "--no-progress")
    assert "15 tokens generated" in out and "tokens/s" in out, out
