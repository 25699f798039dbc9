"""Policy/reference loading (full fine-tune and LoRA) and the final export, on the tiny model.

The LoRA claims are the expensive ones to get wrong silently: a reference that drifts with
the adapter, or base weights that train, makes DPO optimise the wrong objective.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubedpo_trainer import models as models_mod
from kubedpo_trainer import storage
from kubedpo_trainer.config import parse_config
from kubedpo_trainer.errors import InputError
from kubedpo_trainer.export import SUMMARY, export_final
from kubedpo_trainer.models import disable_dropout, load_models, load_tokenizer, resolve_model_source
from kubedpo_trainer.tiny import preference_rows


def _cfg(tiny, tmp_path: Path, lora: dict | None = None, **training):
    model = {"uri": str(tiny.model_dir)}
    if lora is not None:
        model["lora"] = lora
    return parse_config({"model": model, "data": {"train": tiny.train_uri},
                         "training": training, "output": {"uri": str(tmp_path / "out")}})


def _batch(tok, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompt+chosen sequences, right-padded, with a mask on the response tokens."""
    seqs, masks = [], []
    for r in preference_rows(n, seed=seed):
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        a = tok(r["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + a)
        masks.append([False] * len(p) + [True] * len(a))
    t = max(map(len, seqs))
    return {
        "input_ids": torch.tensor([s + [tok.pad_token_id] * (t - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs]),
        "loss_mask": torch.tensor([m + [False] * (t - len(m)) for m in masks]),
    }


def _logps(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    lp = torch.gather(logits.log_softmax(-1), 2, b["input_ids"][:, 1:, None])[..., 0]
    return (lp * b["loss_mask"][:, 1:]).sum(-1)  # (B,)


def _steps(policy, b, n: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps that raise the chosen log-probs (a simple loss, not DPO)."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for _ in range(n):
        loss = -_logps(policy, b).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _base(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny.model_dir).eval()


LORA = {"rank": 4, "alpha": 8, "dropout": 0.1}


def test_lora_reference_is_the_base_model_exactly_before_and_after_training(tiny, tmp_path) -> None:
    m = load_models(_cfg(tiny, tmp_path, LORA))
    tok = load_tokenizer(str(tiny.model_dir))
    b = _batch(tok)
    base = _logps(_base(tiny), b)
    assert m.reference is None and m.is_lora and m.has_reference  # no second copy in memory
    with m.reference_context() as ref:
        assert torch.equal(_logps(ref, b), base)
    assert m.policy.training  # the context restores train mode
    _steps(m.policy, b)
    m.policy.eval()
    with torch.no_grad():
        assert not torch.allclose(_logps(m.policy, b), base)  # the adapter did learn something
    with m.reference_context() as ref:
        after = _logps(ref, b)
        assert not after.requires_grad
    assert torch.equal(after, base)
    with torch.no_grad():  # and the adapter is back on after the context
        assert not torch.allclose(_logps(m.policy, b), base)


def test_lora_trains_only_adapter_weights(tiny, tmp_path) -> None:
    m = load_models(_cfg(tiny, tmp_path, LORA))
    before = {k: v.clone() for k, v in m.policy.state_dict().items()}
    lora_keys = [k for k in before if "lora_" in k]
    # all-linear: every projection in every layer is adapted, the output head is not.
    assert len(lora_keys) == 2 * 7 * 2 and not any("lm_head" in k for k in lora_keys)
    trainable = {n for n, p in m.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    _steps(m.policy, _batch(load_tokenizer(str(tiny.model_dir))))
    after = m.policy.state_dict()
    for k, v in before.items():
        if "lora_" in k:
            assert not torch.equal(after[k], v), f"{k} did not change"
        else:
            assert torch.equal(after[k], v), f"base weight {k} changed"


def test_lora_export_is_the_adapter_and_merged_weights_match(tiny, tmp_path) -> None:
    from peft import PeftModel

    cfg = _cfg(tiny, tmp_path, {**LORA, "mergeOnExport": True})
    m = load_models(cfg)
    tok = load_tokenizer(cfg)
    b = _batch(tok)
    _steps(m.policy, b)
    m.policy.eval()
    out = Path(cfg.output.uri)
    out.mkdir(parents=True)
    (out / SUMMARY).write_text("{}")  # a stale marker from an earlier attempt
    seen_marker_during_upload = []
    real_upload = storage.upload_dir

    def upload(local, uri):
        seen_marker_during_upload.append((out / SUMMARY).exists())
        real_upload(local, uri)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage, "upload_dir", upload)
        export_final(m.policy, tok, cfg, {"step": 3})
    assert seen_marker_during_upload == [False]  # removed first, written last
    assert json.loads((out / SUMMARY).read_text()) == {"step": 3}
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == cfg.model.uri
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()
    with torch.no_grad():
        adapted = m.policy(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        assert torch.allclose(merged(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                              adapted, atol=1e-5)
        reloaded = PeftModel.from_pretrained(_base(tiny), out).eval()
        assert torch.equal(reloaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                           adapted)
        # The caller's model keeps its adapter: merging worked on a copy.
        assert m.is_lora and torch.equal(m.policy(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits,
                                         adapted)


def test_full_finetune_reference_is_a_separate_frozen_copy(tiny, tmp_path) -> None:
    m = load_models(_cfg(tiny, tmp_path, gradientCheckpointing=True))
    assert m.reference is not None and m.reference is not m.policy and not m.is_lora
    assert not m.reference.training and not any(p.requires_grad for p in m.reference.parameters())
    assert all(p.requires_grad for p in m.policy.parameters())
    assert m.policy.is_activation_checkpointing
    tok = load_tokenizer(str(tiny.model_dir))
    b = _batch(tok)
    ref_before = {k: v.clone() for k, v in m.reference.state_dict().items()}
    _steps(m.policy, b)
    assert all(torch.equal(v, m.reference.state_dict()[k]) for k, v in ref_before.items())
    with m.reference_context() as ref:
        assert torch.equal(_logps(ref, b), _logps(_base(tiny), b))
    cfg = _cfg(tiny, tmp_path)
    export_final(m.policy, tok, cfg, {"step": 3}, unwrap=lambda x: x)
    out = Path(cfg.output.uri)
    assert (out / "model.safetensors").is_file() and (out / SUMMARY).is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.use_cache  # checkpointing's use_cache=False is not shipped to users
    m.policy.eval()
    with torch.no_grad():
        assert torch.equal(_logps(reloaded, b), _logps(m.policy, b))


def test_reference_free_loss_loads_no_reference(tiny, tmp_path) -> None:
    m = load_models(_cfg(tiny, tmp_path, loss="simpo"))
    assert m.reference is None and not m.has_reference
    assert m.reference_logps({}) is None
    with pytest.raises(RuntimeError, match="no reference"), m.reference_context():
        pass


def test_lora_with_gradient_checkpointing_backpropagates_into_the_adapter(tiny, tmp_path) -> None:
    m = load_models(_cfg(tiny, tmp_path, LORA, gradientCheckpointing=True))
    b = _batch(load_tokenizer(str(tiny.model_dir)))
    (-_logps(m.policy, b).mean()).backward()
    grads = {n: p.grad for n, p in m.policy.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_model_dtype_is_the_frozen_weights_dtype(tiny, tmp_path) -> None:
    """model.dtype: bfloat16 stores the reference in bf16; the policy that trains stays fp32
    (it used to load in bf16 too, and AdamW stepped bf16 weights)."""
    cfg = parse_config({"model": {"uri": str(tiny.model_dir), "dtype": "bfloat16"},
                        "data": {"train": tiny.train_uri}, "output": {"uri": str(tmp_path)},
                        "training": {"precision": "bf16-mixed"}})
    m = load_models(cfg)
    assert {p.dtype for p in m.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in m.reference.parameters()} == {torch.bfloat16}


def _with_attention_dropout(tiny, tmp_path: Path, p: float) -> Path:
    """The tiny model with `attention_dropout: p` in its config (Llama applies it functionally)."""
    folder = tmp_path / "dropout-model"
    model = AutoModelForCausalLM.from_pretrained(tiny.model_dir, attention_dropout=p)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny.model_dir).save_pretrained(folder)
    return folder


def test_dropout_is_disabled_in_policy_by_default(tiny, tmp_path) -> None:
    """With attention_dropout 0.1 two train-mode forwards differ; after disable_dropout (on by
    default, as TRL) they are identical, and the saved config keeps the user's value."""
    folder = _with_attention_dropout(tiny, tmp_path, 0.1)
    ids = torch.randint(3, 50, (2, 16))
    raw = AutoModelForCausalLM.from_pretrained(folder).train()
    torch.manual_seed(0)
    assert not torch.equal(raw(input_ids=ids).logits, raw(input_ids=ids).logits)
    disable_dropout(raw)
    assert torch.equal(raw(input_ids=ids).logits, raw(input_ids=ids).logits)
    assert raw.config.attention_dropout == 0.1
    cfg = parse_config({"model": {"uri": str(folder)}, "data": {"train": tiny.train_uri},
                        "output": {"uri": str(tmp_path / "out")}})
    m = load_models(cfg)
    assert m.policy.training and torch.equal(m.policy(input_ids=ids).logits, m.policy(input_ids=ids).logits)
    kept = parse_config({**cfg.to_wire(), "training": {"disableDropout": False}})
    noisy = load_models(kept).policy
    assert not torch.equal(noisy(input_ids=ids).logits, noisy(input_ids=ids).logits)


def test_model_sources(tiny, tmp_path) -> None:
    assert resolve_model_source("hf://meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    # Only hf:// reaches the hub: a bare org/name (or a mistyped models/nope) is a local path, and
    # "not found" names the folder that was tried.
    for typo in ("org/name", "models/nope"):
        with pytest.raises(InputError, match=rf"no such folder {re.escape(str(Path(typo).resolve()))}.*hf://org/name"):
            resolve_model_source(typo)
    assert resolve_model_source(str(tiny.model_dir)) == str(tiny.model_dir)
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(InputError, match="no such folder"):
        resolve_model_source(missing)
    with pytest.raises(InputError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))  # exists, but holds no tokenizer


def test_tokenizer_without_pad_gets_eos_as_pad(tiny, tmp_path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny.model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = models_mod.load_tokenizer(str(tmp_path / "tok"))
    assert loaded.pad_token_id == loaded.eos_token_id is not None


class _Wrapper(torch.nn.Module):
    """Stands in for DDP: the real model under `.module`."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def test_reference_and_export_see_through_a_ddp_style_wrapper(tiny, tmp_path) -> None:
    cfg = _cfg(tiny, tmp_path, LORA)
    m = load_models(cfg)
    inner = m.policy
    m.policy = _Wrapper(inner)  # what accelerator.prepare does on several ranks
    assert m.is_lora
    b = _batch(load_tokenizer(cfg))
    with m.reference_context() as ref:
        assert ref is inner
        assert torch.equal(_logps(ref, b), _logps(_base(tiny), b))
    export_final(m.policy, load_tokenizer(cfg), cfg, {}, unwrap=lambda w: w.module)
    assert (Path(cfg.output.uri) / "adapter_model.safetensors").is_file()
