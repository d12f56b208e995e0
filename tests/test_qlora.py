"""QLoRA (`--quantization nf4|fp4|int8`) on a tiny checkpoint whose sizes bitsandbytes' CPU kernels take
(hidden 64, intermediate 128): every decoder linear quantized and computing with its dequantized
weights, the loss falls, the adapter is an ordinary peft adapter that reproduces the trainer's logits
over the same 4-bit model, infer and merge run it, and no command advises trusting remote code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kimi_lora_cli  # noqa: F401  (installs the quiet bitsandbytes import before the skip below imports it)

bnb = pytest.importorskip("bitsandbytes")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from kimi_lora_cli.data.synthetic import write_synthetic_dataset  # noqa: E402
from kimi_lora_cli.loading import load_model  # noqa: E402
from kimi_lora_cli.training.config import TrainConfig  # noqa: E402
from kimi_lora_cli.training.reporting import Reporter  # noqa: E402
from kimi_lora_cli.training.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Relative error of a Gaussian weight matrix stored in 4 bits (measured: nf4 0.092, fp4 0.12; int8 0.01).
WEIGHT_ERROR = {"nf4": (0.06, 0.12), "fp4": (0.08, 0.16), "int8": (0.0005, 0.03)}


@pytest.fixture(scope="module")
def qtiny_dir(tmp_path_factory) -> Path:
    from kimi_lora_cli.models.kimi_audio.tiny import TinySpec, build_tiny_checkpoint

    spec = TinySpec(hidden_size=64, intermediate_size=128)
    return build_tiny_checkpoint(tmp_path_factory.mktemp("qtiny") / "Kimi-Audio-tiny64", spec)


@pytest.fixture(scope="module")
def reference(qtiny_dir):
    return load_model(qtiny_dir, dtype="float32", load_whisper=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory, reference):
    return write_synthetic_dataset(tmp_path_factory.mktemp("qdata"), reference.config, n=6, seed=0, task="mixed")


def make_trainer(model_dir, data, out, **overrides):
    values = dict(data_path=str(data), model_name_or_path=str(model_dir), output_dir=str(out), use_lora=True,
                  lora_dropout=0.0, learning_rate=1e-2, per_device_train_batch_size=3, max_steps=4,
                  logging_steps=1, save_steps=1000, device="cpu", seed=7, quantization="nf4")
    values.update(overrides)
    trainer = Trainer(TrainConfig.build(flag_values=values), Reporter(enabled=False))
    trainer.setup()
    return trainer


def forward(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], text_input_ids=batch["text_input_ids"],
                     is_continuous_mask=batch["is_continuous_mask"],
                     continuous_features=batch["continuous_features"], attention_mask=batch["attention_mask"])


@pytest.fixture(scope="module")
def learned(tmp_path_factory, qtiny_dir, data):
    out = tmp_path_factory.mktemp("qlearned")
    trainer = make_trainer(qtiny_dir, data, out, lora_target="all,heads", max_steps=16, lr_scheduler_type="constant")
    result = trainer.run()
    batch = trainer.dataset.batch(list(range(len(trainer.dataset))))
    model = trainer._unwrapped().eval()
    logits = forward(model, batch)
    return out, result, batch, logits, model


def decoder_linears(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.startswith(("model.layers.", "model.mimo_layers."))
            and isinstance(m, nn.Linear)}


@pytest.mark.parametrize("mode, double", [("nf4", False), ("fp4", True), ("int8", False)])
def test_every_decoder_linear_is_quantized_and_computes_with_its_dequantized_weights(qtiny_dir, reference, mode,
                                                                                     double):
    from kimi_lora_cli.quantization import dequantized_weight

    q = load_model(qtiny_dir, dtype="float32", quantization=mode, double_quant=double, load_whisper=False)
    ref_sd = reference.model.state_dict()
    layers = decoder_linears(q.model)
    kind = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert len(layers) == 7 * (4 + 2) == len(decoder_linears(reference.model))
    assert all(type(m) is kind for m in layers.values()), "a decoder linear was left in full precision"
    low, high = WEIGHT_ERROR[mode]
    dequantized = {}
    for name, m in layers.items():
        assert m.weight.dtype == (torch.int8 if mode == "int8" else torch.uint8)
        w = ref_sd[f"{name}.weight"]
        dq = dequantized_weight(m)
        err = float((dq - w).norm() / w.norm())
        assert low < err < high, (name, err)
        if m.bias is not None:
            assert torch.equal(m.bias, ref_sd[f"{name}.bias"])
        dequantized[f"{name}.weight"] = dq
    # everything else is the float32 checkpoint, untouched
    for name in ("model.embed_tokens.weight", "lm_head.weight", "mimo_output.weight", "model.norm.weight",
                 "model.vq_adaptor.layers.0.weight", "model.layers.0.input_layernorm.weight"):
        t = dict(q.model.named_parameters())[name]
        assert t.dtype == torch.float32 and torch.equal(t, ref_sd[name]), name
    # the quantized forward is the float32 forward with the dequantized weights (nothing else changed)
    ids = torch.randint(0, q.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    text = torch.randint(0, q.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = q.model.eval()(ids, text_input_ids=text)
        swapped = load_model(qtiny_dir, dtype="float32", load_whisper=False).model.eval()
        swapped.load_state_dict({**swapped.state_dict(), **dequantized})
        want = swapped(ids, text_input_ids=text)
        exact = reference.model.eval()(ids, text_input_ids=text)
    tol = 6e-2 if mode == "int8" else 1e-4  # int8 also rounds its inputs (LLM.int8 matmul in float16)
    for head in ("text_logits", "audio_logits"):
        a, b, c = getattr(got, head), getattr(want, head), getattr(exact, head)
        assert float((a - b).norm() / b.norm()) < tol, head
        assert float((a - c).norm() / c.norm()) < 0.6, head  # the model still is the model


def test_meta_skeleton_and_cpu_block_rule(tiny_dir, qtiny_dir):
    from kimi_lora_cli.errors import ModelLoadError

    skeleton = load_model(qtiny_dir, weights=False, quantization="nf4", load_tokenizer_=False)
    assert all(type(m) is bnb.nn.Linear4bit for m in decoder_linears(skeleton.model).values())
    assert skeleton.model.is_loaded_in_4bit
    with pytest.raises(ModelLoadError, match="multiple of 64"):  # hidden 32: a block would span two rows
        load_model(tiny_dir, quantization="nf4", device="cpu", load_whisper=False)
    with pytest.raises(ModelLoadError, match="one of nf4, fp4, int8"):
        load_model(qtiny_dir, quantization="nf3")


def test_qlora_loss_falls(learned):
    out, result, *_ = learned
    assert not result.interrupted and result.global_step == 16
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.5 * first, (first, last)


def test_adapter_is_ordinary_peft_and_gives_the_trainers_logits_over_the_same_4bit_model(learned, qtiny_dir):
    from peft import PeftModel
    from safetensors import safe_open

    out, _, batch, trained_logits, trained_model = learned
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(qtiny_dir) and cfg["peft_type"] == "LORA"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # no 4-bit tensors, no quant state
    card = (out / "README.md").read_text()
    assert "nf4" in card and "qlora" in card
    bases = {n: m for n, m in decoder_linears(trained_model.base_model.model).items() if ".lora_" not in n}
    assert len(bases) == 42 and all(type(m) is bnb.nn.Linear4bit for m in bases.values())

    base = load_model(qtiny_dir, dtype="float32", quantization="nf4", load_whisper=False,
                      load_tokenizer_=False).model
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear4bit)
    got = forward(peft_model, batch)
    for head in ("text_logits", "audio_logits"):
        assert torch.allclose(getattr(got, head), getattr(trained_logits, head), atol=1e-4, rtol=1e-4), head
    with peft_model.disable_adapter():  # the adapter matters
        plain = forward(peft_model, batch)
    assert not torch.allclose(plain.text_logits, got.text_logits, atol=1e-2)


def test_dora_with_gradient_checkpointing(tmp_path, qtiny_dir, data):
    from peft.tuners.lora import LoraLayer

    from kimi_lora_cli.quantization import dequantized_weight

    trainer = make_trainer(qtiny_dir, data, tmp_path / "dora", use_dora=True, gradient_checkpointing=True,
                           max_steps=2, quantization="fp4", double_quant=True)
    model = trainer._unwrapped()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert isinstance(layer, LoraLayer) and isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    magnitude = layer.lora_magnitude_vector["default"].weight
    norms = torch.linalg.norm(dequantized_weight(layer.get_base_layer()), dim=1)
    assert torch.allclose(magnitude.float(), norms, rtol=1e-2)  # DoRA starts from the 4-bit weights' norms
    result = trainer.run()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.last_loss))


def test_int8_with_rslora_and_evaluation_by_decoding(tmp_path, qtiny_dir, data):
    out = tmp_path / "int8"
    result = make_trainer(qtiny_dir, data, out, quantization="int8", use_rslora=True, eval_ratio=0.34,
                          eval_generate="2", eval_steps=2, max_steps=2).run()
    assert result.global_step == 2
    evals = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()
             if "eval_wer" in line]
    assert evals and evals[-1]["eval_generated"] == 2


@pytest.mark.slow
def test_packing(tmp_path, qtiny_dir, data):
    result = make_trainer(qtiny_dir, data, tmp_path / "packed", packing=True, max_steps=2).run()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.last_loss))


def test_infer_and_merge_run_a_qlora_adapter(learned, qtiny_dir, data, tmp_path, cli):
    out = learned[0]
    code, stdout, stderr = cli("infer", "-m", qtiny_dir, "-a", f"q={out}", "--quantization", "nf4", "-d", data,
                               "--max-new-tokens", "4", "--device", "cpu", "--json")
    assert code == 0, stderr
    payload = json.loads(stdout)
    assert payload["metrics"]["q"]["predictions"] == 6
    assert any("nf4: 42 decoder linears" in n for n in payload["notes"])
    code, stdout, stderr = cli("merge", "-m", qtiny_dir, "-a", out, "-o", tmp_path / "merged", "--verify")
    assert code == 0, stderr
    assert "trained over nf4 weights" in " ".join(stderr.split())
    assert "verify text_logits" in stdout and "ok" in stdout


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "0"}
    return subprocess.run([sys.executable, "-m", "kimi_lora_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_no_command_advises_trusting_remote_code(learned, qtiny_dir, data, tmp_path):
    """bitsandbytes' CPU backend asks the `kernels` package for a Hub kernel on import; here it is never
    fetched, and its advice to trust remote code never shows (with and without --quantization)."""
    out = learned[0]
    runs = [run_cli("train", "--model-name-or-path", qtiny_dir, "--data-path", data, "-o", tmp_path / "t",
                    "--use-lora", "--quantization", "nf4", "--double-quant", "--bf16", "--use-dora",
                    "--gradient-checkpointing", "--max-steps", "2", "--device", "cpu"),
            run_cli("infer", "-m", qtiny_dir, "-a", out, "-d", data, "--max-new-tokens", "2", "--device", "cpu")]
    for r in runs:
        assert r.returncode == 0, r.stderr
        text = r.stdout + r.stderr
        assert "trust_remote_code" not in text and "kernels-community" not in text, text
    banner = " ".join(runs[0].stderr.split())
    assert "Quantized nf4 + double quant: 42 decoder linears (both stacks)" in banner
    assert "in bfloat16: Whisper, adaptor, embeddings, heads; norms float32" in banner
    assert "Trained 2 steps" in " ".join((runs[0].stdout + runs[0].stderr).split())


def test_missing_bitsandbytes_is_one_line_before_anything_is_written(qtiny_dir, data, tmp_path):
    code = ("import sys; sys.modules['bitsandbytes'] = None; from kimi_lora_cli.cli.app import main; "
            f"sys.argv = ['kimi-lora', 'train', '--model-name-or-path', {str(qtiny_dir)!r}, '--data-path', "
            f"{str(data)!r}, '-o', {str(tmp_path / 'out')!r}, '--use-lora', '--quantization', 'nf4']; main()")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr and "pip install 'kimi-lora[qlora]'" in " ".join(r.stderr.split()), r.stderr
    assert sum("Error" in x for x in lines) == 1
    assert not (tmp_path / "out").exists()
