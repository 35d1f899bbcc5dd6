"""qlora-train: assistant-only masks, a tiny random Llama trained through the stage, resume.

The model is a tiny random Llama built from a LlamaConfig with the real SmolLM2 tokenizer
(llmpipe.model.source.load_tokenizer), so the chat template, the pad/EOS handling and the
masking are the production ones; only the weights are small.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from llmpipe.io import write_jsonl

from stage_loader import load_stage

SYSTEM = ("You are a support triage assistant. Read the customer's message and answer with only a "
          "JSON object with the keys \"intent\", \"product\", \"urgency\" and \"order_id\".")
INTENTS = ["order_status", "refund_request", "cancel_order", "technical_issue"]
PRODUCTS = ["smart_thermostat", "wireless_earbuds", "robot_vacuum", "coffee_maker"]



def make_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        intent, product = rng.choice(INTENTS), rng.choice(PRODUCTS)
        oid = f"KX{rng.randrange(10**6):06d}" if rng.random() < 0.5 else None
        user = f"Hi, about my {product.replace('_', ' ')}: {intent.replace('_', ' ')} please" + (
            f", order {oid}." if oid else ".")
        reply = json.dumps({"intent": intent, "product": product, "urgency": rng.choice(["low", "high"]),
                            "order_id": oid}, separators=(",", ":"))
        out.append({"id": f"r{seed}-{i}", "metadata": {"intent": intent},
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                                 {"role": "assistant", "content": reply}]})
    return out


@pytest.fixture(scope="module")
def tokenizer():
    from llmpipe.model.base import fix_pad_token
    from llmpipe.model.source import load_tokenizer

    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    fix_pad_token(tok)
    return tok


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer) -> Path:
    """A random 2-layer Llama with the SmolLM2 tokenizer, saved like the base-model stage does."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny_base")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


ROOT = Path(__file__).resolve().parents[1]


def write_params(path: Path, **train_overrides) -> Path:
    """The repository's params.yaml (every key: no defaults in code) with a tiny training run."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seed"] = 7
    params["model"]["max_seq_len"] = 256
    params["lora"].update(r=4, alpha=8, dropout=0.1, target_modules="all-linear")
    params["train"].update(quantization="nf4", precision="auto", epochs=1, max_steps=6, learning_rate=1e-3,
                           lr_scheduler="cosine", warmup_ratio=0.1, per_device_batch_size=2,
                           gradient_accumulation_steps=1, micro_batch_size="auto", packing=True, eval_steps=3,
                           save_steps=2, save_total_limit=5, logging_steps=1, num_processes=1, cpu_threads=0)
    params["train"].update(train_overrides)
    path.write_text(yaml.safe_dump(params))
    return path


def sections(**train):
    """Typed lora/train sections: params.yaml's, with ``train`` overrides."""
    from llmpipe.config import load_params

    p = load_params(ROOT / "params.yaml")
    return p.lora, type(p.train)(**{**p.train.model_dump(), **train})


@pytest.fixture()
def workdir(tmp_path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", make_records(24, 1))
    write_jsonl(tmp_path / "val.jsonl", make_records(4, 2))
    return tmp_path


def stage_args(wd: Path, base: Path, params: Path, tag: str = "") -> list[str]:
    return ["--params", str(params), "--base", str(base), "--train", str(wd / "train.jsonl"),
            "--val", str(wd / "val.jsonl"), "--adapter", str(wd / f"adapter{tag}"),
            "--checkpoints", str(wd / f"ckpt{tag}"), "--live-dir", str(wd / f"live{tag}"),
            "--metrics", str(wd / f"train{tag}.json"), "--timings-root", str(wd / f"timings{tag}")]


# ---------------------------------------------------------------- assistant-only mask


def test_label_mask_covers_only_the_assistant_reply_and_its_end_of_turn(tokenizer):
    from llmpipe.train.data import IGNORE_INDEX, decode_targets, tokenize_example

    rec = make_records(1, 3)[0]
    ids, labels = tokenize_example(tokenizer, rec["messages"])
    reply = rec["messages"][-1]["content"]
    # Exactly the reply plus the learned end-of-turn token: no system/user text, no role header,
    # no trailing newline.
    assert decode_targets(tokenizer, ids, labels) == reply + tokenizer.eos_token
    # The end-of-turn token is learned; the pad token is a different token.
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    target_positions = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert ids[target_positions[-1]] == tokenizer.eos_token_id
    # Targets are one contiguous block at the end (before the template's trailing newline).
    assert target_positions == list(range(target_positions[0], target_positions[-1] + 1))
    masked = tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert SYSTEM in masked and "order" in masked and reply not in masked


def test_multi_turn_masks_every_assistant_turn(tokenizer):
    from llmpipe.train.data import decode_targets, tokenize_example

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "first?"},
            {"role": "assistant", "content": "one"}, {"role": "user", "content": "second?"},
            {"role": "assistant", "content": "two"}]
    ids, labels = tokenize_example(tokenizer, msgs)
    eot = tokenizer.eos_token
    assert decode_targets(tokenizer, ids, labels) == f"one{eot}two{eot}"


def test_too_long_examples_are_skipped_with_a_reason(tokenizer):
    from llmpipe.train.data import tokenize_records

    recs = make_records(3, 4)
    recs[1]["messages"][1]["content"] = "word " * 400
    tok = tokenize_records(tokenizer, recs, max_seq_len=256)
    assert len(tok.input_ids) == 2
    assert tok.skipped[0]["id"] == recs[1]["id"] and "max_seq_len" in tok.skipped[0]["reason"]


def test_checkpoint_of_a_finished_run_is_not_resumed(tmp_path):
    from llmpipe.train.trainer import prepare_checkpoints

    ck = tmp_path / "ckpt"
    for step, max_steps in ((10, 20), (20, 20)):
        d = ck / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    assert prepare_checkpoints(ck, "fp1", resume=True) is None       # last = step 20 of 20: finished
    assert not list(ck.glob("checkpoint-*"))
    d = ck / "checkpoint-10"
    d.mkdir()
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 10, "max_steps": 20}))
    assert prepare_checkpoints(ck, "fp1", resume=True) == str(d)     # interrupted: resumed
    assert prepare_checkpoints(ck, "fp2", resume=True) is None       # other params/data: discarded
    assert not list(ck.glob("checkpoint-*"))


def test_bad_record_error_names_file_and_line(tmp_path):
    from llmpipe.train.data import DataError, load_records

    p = tmp_path / "train.jsonl"
    p.write_text(json.dumps(make_records(1, 5)[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: invalid JSON"):
        load_records(p)
    # blank lines are skipped but counted: the error names the physical line
    p.write_text(json.dumps(make_records(1, 5)[0]) + "\n\n" + json.dumps({"messages": []}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:3: record has no valid 'messages' list"):
        load_records(p)
    with pytest.raises(DataError, match=r"not found.*run the split stage"):
        load_records(tmp_path / "missing.jsonl")


def test_cpu_falls_back_from_nf4_and_says_so():
    from llmpipe.train.config import resolve_runtime

    lora, tp = sections(quantization="nf4")
    rt = resolve_runtime(tp, lora, seq_len=256, cuda=False)
    assert rt.mode == "lora" and rt.precision == "fp32" and rt.optimizer == "adamw_torch"
    assert any("falling back to LoRA" in n for n in rt.notes)
    # CPU: the memory rule keeps every row of the step in one forward, nothing recomputed
    assert (rt.gradient_checkpointing, rt.activation_offloading, rt.micro_batch_size) == (False, False, 2)
    assert rt.gradient_accumulation_steps == 1 and rt.picked["reason"].startswith("no GPU")


def test_train_section_rejects_bad_values_with_the_key_path(tmp_path):
    """The checks that lived in TrainParams._check are the section model's now: the error names the key."""
    from llmpipe.config import ParamsError, load_params

    def check(match: str, **train) -> None:
        with pytest.raises(ParamsError, match=match):
            load_params(write_params(tmp_path / "p.yaml", **train))

    check(r"train\.compile: .*'sometimes'", compile="sometimes")
    check(r"train\.activation_offloading", activation_offloading="maybe")
    check(r"train\.distributed", distributed="deepspeed")
    check(r"train\.per_device_batch_size", per_device_batch_size=0)
    check(r"micro_batch_size \(3\) must be 'auto' or a divisor", per_device_batch_size=4, micro_batch_size=3)
    check(r"train\.epochz: unknown key \(did you mean 'train\.epochs'\?\)", epochz=1)
    p = yaml.safe_load(write_params(tmp_path / "p.yaml").read_text())
    p["lora"]["target_modules"] = []
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(ParamsError, match=r"lora\.target_modules"):
        load_params(tmp_path / "p.yaml")
    assert load_params(write_params(tmp_path / "p.yaml", compile=False)).train.compile is False


def test_compile_path_is_resolved_and_reported(monkeypatch):
    """train.compile: off on CPU (auto: silently, true: with a note), on for CUDA when triton is there."""
    from llmpipe.train import config as cfg
    from llmpipe.train.config import resolve_runtime

    def rt_of(cuda: bool, **train):
        lora, tp = sections(**train)
        return resolve_runtime(tp, lora, seq_len=256, cuda=cuda)

    rt = rt_of(False)
    assert rt.compile is False and rt.to_dict()["compile"] is False
    assert not [n for n in rt.notes if "compile" in n]
    rt = rt_of(False, compile=True)
    assert rt.compile is False and any("train.compile=true needs CUDA" in n for n in rt.notes)

    gpu = dict(precision="bf16", attn_implementation="sdpa", quantization="none")
    monkeypatch.setattr(cfg, "_compile_available", lambda: None)
    assert rt_of(True, **gpu).compile is True
    assert rt_of(True, compile=False, **gpu).compile is False
    rt = rt_of(True, num_processes=2, distributed="fsdp", **gpu)
    assert rt.compile is False and any("FSDP" in n for n in rt.notes)
    monkeypatch.setattr(cfg, "_compile_available", lambda: "triton is not installed")
    rt = rt_of(True, **gpu)
    assert rt.compile is False and any("triton is not installed; running eager" in n for n in rt.notes)


def test_activation_offloading_is_resolved_and_reaches_trl(tmp_path):
    """train.activation_offloading: asked for on CPU it stays off with a note; on CUDA it becomes
    TRL's SFTConfig.activation_offloading. It changes no numbers, so it is left out of the
    checkpoint fingerprint. (What "auto" picks on a GPU: tests/test_train_memory.py.)"""
    import dataclasses

    from llmpipe.train.config import resolve_runtime
    from llmpipe.train.trainer import NOT_FINGERPRINTED, build_sft_config

    assert "activation_offloading" in NOT_FINGERPRINTED
    gpu = dict(precision="bf16", attn_implementation="sdpa", compile=False, quantization="none")
    lora, tp = sections(activation_offloading=True, **gpu)
    rt = resolve_runtime(tp, lora, seq_len=256, cuda=True)       # no shape: the setting is kept as is
    assert rt.activation_offloading is True and rt.to_dict()["activation_offloading"] is True
    lora, tp_cpu = sections(activation_offloading=True)
    rt_cpu = resolve_runtime(tp_cpu, lora, seq_len=256, cuda=False)
    assert rt_cpu.activation_offloading is False
    assert any("activation_offloading=true needs CUDA" in n for n in rt_cpu.notes)
    assert build_sft_config(tp_cpu, rt_cpu, tmp_path, 256, has_eval=False, seed=0).activation_offloading is False
    rt_on = dataclasses.replace(rt_cpu, activation_offloading=True)
    assert build_sft_config(tp_cpu, rt_on, tmp_path, 256, has_eval=False, seed=0).activation_offloading is True


def test_regional_compile_wraps_every_decoder_layer():
    """compile_decoder_layers compiles each decoder layer in place (lazily: nothing runs here)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmpipe.train.trainer import compile_decoder_layers

    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg)
    try:
        assert compile_decoder_layers(model) == 3
        assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
        assert model._compiled_call_impl is None          # regional: the model itself stays eager
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------- training through the stage


def test_stage_trains_tiny_llama_and_writes_adapter_metrics_and_plots(workdir, tiny_base):
    stage = load_stage("train")
    params = write_params(workdir / "params.yaml")
    assert stage.main(stage_args(workdir, tiny_base, params)) == 0

    m = json.loads((workdir / "train.json").read_text())
    assert m["mode"] == "lora" and m["device"] == "cpu"          # nf4 requested, CPU fallback recorded
    assert m["compile"] is False                                 # CPU: eager, as before
    assert any("falling back" in n for n in m["fallback_notes"])
    assert m["steps"] == 6 and m["tokens_seen"] > 0
    assert m["val_loss"] is not None and m["train_loss"] is not None
    assert m["picked"]["micro_batch_size"] == 2 and m["gradient_accumulation_steps"] == 1
    # wall-clock numbers are timings, not metrics (metrics/train.json is diffed by reviewers)
    t = json.loads((workdir / "timings" / "timings" / "qlora-train.json").read_text())
    assert t["tokens_per_s"] > 0 and t["peak_memory_gb"] > 0 and t["stage_seconds"] > 0
    assert not [k for k in m if k.endswith(("_seconds", "_per_s", "_gb"))], sorted(m)
    assert (workdir / "adapter" / "adapter_model.safetensors").is_file()
    assert (workdir / "adapter" / "adapter_config.json").is_file()
    plots = workdir / "live" / "plots" / "metrics"
    loss_tsv = (plots / "train" / "loss.tsv").read_text().splitlines()
    assert loss_tsv[0].split("\t")[:2] == ["step", "loss"] and len(loss_tsv) >= 6
    assert (plots / "eval" / "loss.tsv").is_file()
    # Random init: training must reduce the loss on the (tiny, repetitive) data.
    first = float(loss_tsv[1].split("\t")[1])
    assert m["train_loss"] < first


def _tree_hashes(*dirs: Path) -> dict[str, str]:
    from llmpipe.io import sha256_file

    files = [(d, f) for d in dirs for f in ([d] if d.is_file() else sorted(d.rglob("*"))) if f.is_file()]
    return {str(f.relative_to(d.parent)): sha256_file(f) for d, f in files}


def test_two_runs_on_the_same_inputs_write_byte_identical_outputs(workdir, tiny_base):
    """Adapter, checkpoints (trainer_state.json without the Trainer's *_runtime / *_per_second
    fields, sorted target_modules), plots and metrics hash the same on a re-run, so DVC sees no
    change; the timings go to timings/qlora-train.json."""
    stage = load_stage("train")
    args = stage_args(workdir, tiny_base, write_params(workdir / "params.yaml"))
    outs = [workdir / n for n in ("adapter", "ckpt", "live", "train.json")]
    assert stage.main(args) == 0
    first = _tree_hashes(*outs)
    state = json.loads((workdir / "ckpt" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["log_history"] and not [k for h in state["log_history"] for k in h
                                         if k.endswith(("_runtime", "_per_second"))]
    assert stage.main(args) == 0     # the last checkpoint is a finished run: trains again from scratch
    second = _tree_hashes(*outs)
    assert any(k.startswith("ckpt/checkpoint-6/") for k in first)
    assert first == second, {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)}


def test_model_card_tags_are_sorted_so_checkpoints_hash_the_same_in_every_process(tmp_path):
    """TRL builds the card's tags from a set: their order follows PYTHONHASHSEED, and CI saw the
    checkpoints dir change on a forced re-run (README.md only). The order is made canonical."""
    from llmpipe.train.trainer import sort_model_card_tags

    body = "# Model Card\n\n- a list in the body\n- stays as it is\n"
    for order in (["trl", "sft", "generated_from_trainer"], ["sft", "generated_from_trainer", "trl"]):
        card = tmp_path / f"{order[0]}.md"
        card.write_text("---\nlibrary_name: transformers\ntags:\n" + "".join(f"- {t}\n" for t in order)
                        + "licence: license\n---\n" + body)
        sort_model_card_tags(card)
        assert card.read_text() == ("---\nlibrary_name: transformers\ntags:\n- generated_from_trainer\n- sft\n"
                                    "- trl\nlicence: license\n---\n" + body)
    sort_model_card_tags(tmp_path / "missing.md")          # no card: nothing to do


def _adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


class _Interrupt(Exception):
    pass


def _interrupt_after(step: int):
    from transformers import TrainerCallback

    class InterruptCallback(TrainerCallback):
        """Simulates a kill right after the checkpoint at ``step`` was written."""

        def on_save(self, args, state, control, **kw):
            if state.global_step >= step:
                raise _Interrupt(f"interrupted after step {state.global_step}")

    return InterruptCallback()


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_adapter(workdir, tiny_base):
    """Tolerance: max |delta| <= 1e-5 over all adapter tensors (same seed, fp32, CPU)."""
    stage = load_stage("train")
    params = write_params(workdir / "params.yaml")
    assert stage.main(stage_args(workdir, tiny_base, params, "_full")) == 0

    args = stage_args(workdir, tiny_base, params, "_resumed")
    with pytest.raises(_Interrupt):
        stage.main(args, callbacks=[_interrupt_after(4)])
    assert not (workdir / "adapter_resumed").exists()     # nothing half-written
    assert (workdir / "ckpt_resumed" / "checkpoint-4").is_dir()
    assert stage.main(args) == 0
    m = json.loads((workdir / "train_resumed.json").read_text())
    assert m["resumed_from"] == "checkpoint-4" and m["steps"] == 6

    full, resumed = _adapter_tensors(workdir / "adapter_full"), _adapter_tensors(workdir / "adapter_resumed")
    assert full.keys() == resumed.keys() and full
    diff = max(float((full[k] - resumed[k]).abs().max()) for k in full)
    assert diff <= 1e-5, f"resumed adapter differs from uninterrupted one by {diff}"
    # The resumed run's plots continue the interrupted run's steps instead of starting over.
    steps = [int(line.split("\t")[0]) for line in
             (workdir / "live_resumed" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[0] <= 1 and steps[-1] == 6


def test_changed_params_discard_stale_checkpoints(workdir, tiny_base):
    stage = load_stage("train")
    args = stage_args(workdir, tiny_base, write_params(workdir / "params.yaml", max_steps=2))
    assert stage.main(args) == 0
    assert (workdir / "ckpt" / "checkpoint-2").is_dir()
    # lora.r changes -> different fingerprint -> fresh run (not a resume of an incompatible adapter)
    p = yaml.safe_load((workdir / "params.yaml").read_text())
    p["lora"]["r"] = 8
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    assert stage.main(args) == 0
    m = json.loads((workdir / "train.json").read_text())
    assert m["resumed_from"] is None and m["lora"]["r"] == 8
    cfg = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8
    # peft stores target_modules from a set; the stage sorts it so the adapter is byte-reproducible
    assert cfg["target_modules"] == sorted(cfg["target_modules"]) and len(cfg["target_modules"]) > 3


def test_launch_command_and_what_the_processes_run(tmp_path, monkeypatch):
    """train.num_processes > 1: torchrun on this machine, unless already inside a launched worker.
    FSDP is what accelerate builds for GPU process groups; on CPU the processes run DDP and the
    runtime says so (tests/test_train_multiprocess.py runs the CPU path for real)."""
    import sys

    from llmpipe.train.config import resolve_runtime
    from llmpipe.train.launch import launch_command, needs_relaunch
    from llmpipe.train.trainer import build_sft_config

    script = str(ROOT / "stages" / "train.py")
    assert launch_command(4, script, ["--params", "p.yaml"]) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "4",
        script, "--params", "p.yaml"]
    lora, tp = sections(num_processes=2, distributed="fsdp", precision="fp32", attn_implementation="sdpa",
                        compile=False, quantization="none")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert needs_relaunch(tp) and not needs_relaunch(sections(num_processes=1)[1])

    rt = resolve_runtime(tp, lora, seq_len=256, cuda=True)
    assert rt.distributed == "fsdp" and not rt.notes
    args = build_sft_config(tp, rt, tmp_path, 256, has_eval=False, seed=0)
    assert args.fsdp and args.fsdp_config["use_orig_params"] is True
    rt = resolve_runtime(tp, lora, seq_len=256, cuda=False)
    assert rt.distributed == "ddp" and any("the CPU processes run DDP" in n for n in rt.notes)
    assert not build_sft_config(tp, rt, tmp_path, 256, has_eval=False, seed=0).fsdp
    lora1, tp1 = sections()
    assert resolve_runtime(tp1, lora1, seq_len=256, cuda=False).distributed == "none"
    monkeypatch.setenv("LOCAL_RANK", "0")     # inside a torchrun worker: no second relaunch
    assert not needs_relaunch(tp)
