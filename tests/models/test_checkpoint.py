"""Checkpoint import/export: our files round-trip, the official and HF layouts import, .ckpt files load."""

import json
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_mamba.data.tokenization import ByteTokenizer
from lightning_mamba.models import ConfigError, MambaConfig, MambaLM
from lightning_mamba.models.checkpoint import load_pretrained, load_tokenizer_spec, save_pretrained
from lightning_mamba.training.checkpoint_io import load_model
from lightning_mamba.training.module import MambaLitModule

SSM = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16}


def tiny(tie=True, seed=0, **kw) -> MambaLM:
    torch.manual_seed(seed)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_cfg=dict(SSM), pad_vocab_size_multiple=16,
                      tie_embeddings=tie, **kw)
    model = MambaLM(cfg, backend="torch").eval()
    with torch.no_grad():  # move the ones/zeros-initialised tensors too, so a misplaced one shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)[0]


IDS = torch.randint(0, 50, (2, 37), generator=torch.Generator().manual_seed(1))


@dataclass
class OfficialMambaConfig:  # mamba_ssm/models/config_mamba.py, field for field
    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, tie):
    model = tiny(tie=tie)
    save_pretrained(model, str(tmp_path / "out"), extra={"seq_len": 64})
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "lightning_mamba.json", "pytorch_model.bin"]
    loaded = load_pretrained(str(tmp_path / "out"), backend="torch")
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), rtol=0, atol=0)
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == tie


def test_files_are_what_the_official_from_pretrained_reads(tmp_path):
    model = tiny()
    save_pretrained(model, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    OfficialMambaConfig(**config)  # what from_pretrained does with config.json: no unknown field
    assert config["ssm_cfg"]["layer"] == "Mamba2" and config["pad_vocab_size_multiple"] == 16
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert list(state) == list(model.state_dict())  # lm_head.weight included although tied
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    assert json.loads((tmp_path / "lightning_mamba.json").read_text()) == {"tokenizer": None}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_a_device_models_tied_weights_are_stored_once(tmp_path, monkeypatch):
    """Saved from a GPU, the tied embedding and lm_head are still one tensor under two keys in the file (moving each
    key to the CPU apart gave two copies: a file with the embedding twice). Here Tensor.cpu copies, as it does from a
    device (on CUDA the test runs for real)."""
    model = tiny()
    if torch.cuda.is_available():
        model = model.cuda()
    else:
        monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: self.clone())
    save_pretrained(model, str(tmp_path))
    monkeypatch.undo()
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    head, embedding = state["lm_head.weight"], state["backbone.embedding.weight"]
    assert head.device.type == "cpu" and head.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()
    loaded = load_pretrained(str(tmp_path), backend="torch")
    torch.testing.assert_close(logits(loaded, IDS), logits(tiny(), IDS), rtol=0, atol=0)


def test_project_scan_settings_stay_out_of_the_official_config(tmp_path):
    """Project-only settings (quadratic_max_len, save_chunk_states, recompute_norm_output): official mamba_ssm's Mamba2(**ssm_cfg) would
    refuse them, and they change no result."""
    model = tiny()
    quadratic = MambaLM(MambaConfig(**{**model.config.to_dict(),
                                       "ssm_cfg": {**SSM, "quadratic_max_len": 64, "save_chunk_states": True,
                                                   "recompute_norm_output": True}}),
                        backend="torch").eval()
    quadratic.load_state_dict(model.state_dict())
    save_pretrained(quadratic, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    OfficialMambaConfig(**config)
    assert {"quadratic_max_len", "save_chunk_states", "recompute_norm_output"}.isdisjoint(config["ssm_cfg"])
    assert config["ssm_cfg"]["chunk_size"] == 16
    loaded = load_pretrained(str(tmp_path), backend="torch")
    m = loaded.mixers[0]
    assert (m.quadratic_max_len, m.save_chunk_states, m.recompute_norm_output) == (0, False, False)
    torch.testing.assert_close(logits(loaded, IDS), logits(quadratic, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_half_precision_files_load_cast(tmp_path, dtype, tol):
    model = tiny()
    save_pretrained(tiny().to(dtype), str(tmp_path))
    assert torch.load(tmp_path / "pytorch_model.bin")["backbone.norm_f.weight"].dtype == dtype
    loaded = load_pretrained(str(tmp_path), backend="torch")
    assert loaded.backbone.norm_f.weight.dtype == torch.float32
    for (name, p), q in zip(loaded.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q.to(dtype).float(), rtol=0, atol=0, msg=name)
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), rtol=tol, atol=tol)
    assert load_pretrained(str(tmp_path), backend="torch", dtype=dtype).lm_head.weight.dtype == dtype


def official_shapes(d_model, n_layer, vocab, d_state, headdim, ngroups, expand=2, d_conv=4, pad=16):
    """state_dict key -> shape, from docs/mamba2.md (independent of our model code)."""
    d_inner = expand * d_model
    nheads, conv_dim, padded = d_inner // headdim, d_inner + 2 * ngroups * d_state, vocab + (-vocab) % pad
    shapes = {"backbone.embedding.weight": (padded, d_model)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        shapes.update({p + "norm.weight": (d_model,),
                       p + "mixer.in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
                       p + "mixer.conv1d.weight": (conv_dim, 1, d_conv), p + "mixer.conv1d.bias": (conv_dim,),
                       p + "mixer.dt_bias": (nheads,), p + "mixer.A_log": (nheads,), p + "mixer.D": (nheads,),
                       p + "mixer.norm.weight": (d_inner,), p + "mixer.out_proj.weight": (d_model, d_inner)})
    shapes.update({"backbone.norm_f.weight": (d_model,), "lm_head.weight": (padded, d_model)})
    return shapes


@pytest.mark.parametrize("tie", [True, False])
def test_official_layout_written_by_hand_imports(tmp_path, tie):
    config = OfficialMambaConfig(d_model=32, n_layer=3, vocab_size=50, pad_vocab_size_multiple=16, tie_embeddings=tie,
                                 ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2})
    (tmp_path / "config.json").write_text(json.dumps(config.__dict__, indent=4))  # as the official save_pretrained
    shapes = official_shapes(32, 3, 50, d_state=16, headdim=16, ngroups=2)
    state = {k: torch.randn(s) for k, s in shapes.items()}
    if tie:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = load_pretrained(str(tmp_path), backend="torch")
    ours = model.state_dict()
    assert set(ours) == set(shapes) and len(shapes) == 3 + 9 * 3
    for key, value in state.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    assert load_tokenizer_spec(str(tmp_path)) is None
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')  # e.g. NeoX's, next to a download
    assert load_tokenizer_spec(str(tmp_path)) == {"kind": "json", "json": '{"model": {"type": "BPE"}}'}


def hf_config(model: MambaLM) -> dict:
    cfg, m = model.config, model.config.mixer
    return {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layer, "vocab_size": cfg.padded_vocab_size, "num_heads": cfg.nheads,
            "head_dim": m["headdim"], "state_size": m["d_state"], "n_groups": m["ngroups"], "expand": m["expand"],
            "conv_kernel": m["d_conv"], "chunk_size": m["chunk_size"], "use_bias": False, "use_conv_bias": True,
            "residual_in_fp32": True, "tie_word_embeddings": cfg.tie_embeddings, "layer_norm_epsilon": 1e-5,
            "time_step_limit": [0.0, float("inf")], "time_step_min": 0.001, "time_step_max": 0.1,
            "time_step_floor": 1e-4, "rms_norm": True, "norm_before_gate": False, "initializer_range": 0.1}


@pytest.mark.parametrize("tie", [True, False])
def test_hf_transformers_layout_imports(tmp_path, tie):
    model = tiny(tie=tie)
    state = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v.clone()
             for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    loaded = load_pretrained(str(tmp_path), backend="torch")
    assert loaded.config.padded_vocab_size == 64 and loaded.config.tie_embeddings == tie
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), rtol=0, atol=0)


def hf_mamba2(transformers, tie: bool, ngroups: int):
    """A small HF Mamba2ForCausalLM with perturbed weights. in_proj's width 2 x 64 + 2 x ngroups x 16 + 8 (200 or 168)
    is a multiple of 8, as causal_conv1d's channel-last layout needs."""
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(hidden_size=32, num_hidden_layers=2, vocab_size=64, num_heads=8, head_dim=8,
                                    state_size=16, n_groups=ngroups, expand=2, chunk_size=16, tie_word_embeddings=tie)
    hf = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def test_hf_transformers_model_gives_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    for tie in (True, False):
        hf = hf_mamba2(transformers, tie, ngroups=2)
        if not hasattr(hf.backbone.layers[0].mixer.norm, "group_size"):
            # Releases whose gated RMSNorm has no groups (5.17; 5.25 has them) normalize all groups at once where
            # mamba_ssm normalizes each: with 2 groups theirs is another model (logits off by up to ~2). One group.
            hf = hf_mamba2(transformers, tie, ngroups=1)
        directory = str(tmp_path / f"tie{tie}")
        hf.save_pretrained(directory)
        ours = load_pretrained(directory, backend="torch")
        # Where CUDA is, HF runs there: recent transformers call causal_conv1d's CUDA-only kernel whenever it is
        # installed, even on CPU tensors. Its CUDA path may take mamba_ssm's Triton scan, whose fp32 dots are TF32.
        device, tol = ("cuda", 2e-3) if torch.cuda.is_available() else ("cpu", 1e-4)
        with torch.no_grad():  # 37 tokens: HF's torch path pads to a multiple of chunk_size itself
            expected = hf.to(device)(IDS.to(device), use_cache=False).logits.cpu()
        torch.testing.assert_close(logits(ours, IDS), expected, rtol=tol, atol=tol)


def test_an_untied_head_under_a_tied_config_is_refused(tmp_path):
    """config.json says tied but the weights hold their own lm_head: taking the embedding for it changed every logit
    silently; now one line that says which setting to change. A tied model's saved copy of its head loads."""
    save_pretrained(tiny(tie=False), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config ties the embeddings .* but lm_head.weight differs from "
                                          r"backbone.embedding.weight: set it to false in config.json"):
        load_pretrained(str(tmp_path), backend="torch")
    model = tiny(tie=True)
    save_pretrained(model, str(tmp_path / "tied"))  # writes lm_head.weight too, equal to the embedding
    torch.testing.assert_close(logits(load_pretrained(str(tmp_path / "tied"), backend="torch"), IDS),
                               logits(model, IDS), rtol=0, atol=0)


def test_wrong_shape_names_the_key(tmp_path):
    save_pretrained(tiny(), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["ssm_cfg"]["d_state"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"different model shape: backbone.layers.0.mixer.in_proj.weight is "
                                          r"\(196, 32\) in the checkpoint but \(164, 32\) in the model"):
        load_pretrained(str(tmp_path), backend="torch")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = tiny()
    state = model.state_dict()
    torch.save({k: v for k, v in state.items() if k != "backbone.norm_f.weight"}, tmp_path / "pytorch_model.bin")
    save_pretrained(model, str(tmp_path / "full"))
    os.replace(tmp_path / "full" / "config.json", tmp_path / "config.json")
    with pytest.raises(ConfigError, match="backbone.norm_f.weight is missing from the checkpoint"):
        load_pretrained(str(tmp_path), backend="torch")
    torch.save({**state, "backbone.layers.0.mixer.x_proj.weight": torch.zeros(3, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"unexpected key backbone.layers.0.mixer.x_proj.weight \(3, 2\)"):
        load_pretrained(str(tmp_path), backend="torch")


def test_missing_directory_or_config_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="config.json is missing"):
        load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "ssm_cfg": {}}))  # official Mamba-1
    with pytest.raises(ConfigError, match="not a Mamba-2 checkpoint"):
        load_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(str(tmp_path / "run.ckpt"))


def test_unknown_mixer_setting_in_config_json_is_a_one_line_error(tmp_path):
    # a misspelt or foreign ssm_cfg key reached Mamba2(**mixer): a TypeError traceback from every command
    save_pretrained(tiny(), str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["ssm_cfg"]["d_stat"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json: ssm_cfg has settings the Mamba2 mixer does not take: d_stat"):
        load_pretrained(str(tmp_path), backend="torch")


@pytest.mark.parametrize("index", [{"metadata": {}}, {"weight_map": ["model-1.bin"]}])
def test_sharded_index_without_a_weight_map_is_a_one_line_error(tmp_path, index):
    # a KeyError / AttributeError traceback before
    save_pretrained(tiny(), str(tmp_path))
    os.remove(tmp_path / "pytorch_model.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"pytorch_model.bin.index.json: expected a weight_map object"):
        load_pretrained(str(tmp_path), backend="torch")


@pytest.mark.parametrize("seq_len", ["2K", 2.5, 0, True])
def test_damaged_seq_len_in_lightning_mamba_json_is_a_one_line_error(tmp_path, seq_len):
    # the commands computed with it (passkey: "can't multiply sequence by non-int" traceback) and --model.pretrained
    # handed it to data.seq_len (a jsonargparse dump)
    from lightning_mamba.training.checkpoint_io import pretrained_meta

    save_pretrained(tiny(), str(tmp_path), extra={"seq_len": seq_len})
    for load in (load_model, pretrained_meta):
        with pytest.raises(ConfigError, match=r"lightning_mamba.json: seq_len must be the training length in tokens"):
            load(str(tmp_path))


def test_json_tokenizer_is_written_to_tokenizer_json(tmp_path):
    spec = {"kind": "json", "json": ByteTokenizer().to_hf().to_str()}
    save_pretrained(tiny(), str(tmp_path), tokenizer_spec=spec, extra={"seq_len": 64})
    assert (tmp_path / "tokenizer.json").read_text() == spec["json"]
    assert load_tokenizer_spec(str(tmp_path)) == spec
    _, meta = load_model(str(tmp_path), backend="torch")
    assert meta["tokenizer"] == spec and meta["seq_len"] == 64 and meta["mamba_config"]["d_model"] == 32
    save_pretrained(tiny(), str(tmp_path), tokenizer_spec={"kind": "byte"})  # the stale tokenizer.json is ignored
    assert load_tokenizer_spec(str(tmp_path)) == {"kind": "byte"}


# ---- Lightning checkpoints ----------------------------------------------------------------------
class TinyData(L.LightningDataModule):
    """What on_save_checkpoint reads from a data module: hparams.seq_len and tokenizer.to_spec()."""

    def __init__(self, spec, seq_len=16, vocab=50):
        super().__init__()
        self.save_hyperparameters({"seq_len": seq_len})
        self.tokenizer = SimpleNamespace(to_spec=lambda: spec)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (8, seq_len + 1), generator=g)
        self.rows = [{"input_ids": r[:-1], "labels": r[1:]} for r in ids]

    def train_dataloader(self):
        return DataLoader(self.rows, batch_size=4)


def make_ckpt(directory, spec=None) -> tuple[str, MambaLitModule]:
    """A real .ckpt of a 1-step fit of a tiny MambaLitModule (with a data module when ``spec`` is given)."""
    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, ngroups=2, chunk_size=16, vocab_size=50,
                            pad_vocab_size_multiple=16, backend="torch", warmup_steps=0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(directory))
    data = TinyData(spec)
    if spec is None:
        trainer.fit(module, train_dataloaders=data.train_dataloader())
    else:
        trainer.fit(module, datamodule=data)
    path = os.path.join(str(directory), "run.ckpt")
    trainer.save_checkpoint(path)
    return path, module


def test_lightning_ckpt_loads_with_its_metadata(tmp_path):
    spec = {"kind": "json", "json": ByteTokenizer().to_hf().to_str()}
    path, module = make_ckpt(tmp_path, spec)
    model, meta = load_model(path, backend="torch")
    assert meta["tokenizer"] == spec and meta["seq_len"] == 16 and meta["mamba_config"]["ssm_cfg"]["ngroups"] == 2
    torch.testing.assert_close(logits(model, IDS), logits(module.model, IDS), rtol=0, atol=0)
    # A checkpoint without our metadata is rebuilt from the LightningModule's hyper_parameters.
    ckpt = torch.load(path, weights_only=False)
    del ckpt["lightning_mamba"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    model, meta = load_model(str(tmp_path / "old.ckpt"), backend="torch")
    assert "tokenizer" not in meta and meta["mamba_config"]["pad_vocab_size_multiple"] == 16
    torch.testing.assert_close(logits(model, IDS), logits(module.model, IDS), rtol=0, atol=0)


def test_lightning_ckpt_without_datamodule(tmp_path):
    path, module = make_ckpt(tmp_path)
    model, meta = load_model(path, backend="torch", dtype=torch.float64)
    assert set(meta) == {"mamba_config", "trained_steps", "trained_tokens"}  # no data module's seq_len, tokenizer
    assert model.lm_head.weight.dtype == torch.float64
    torch.testing.assert_close(logits(model, IDS).float(), logits(module.model, IDS), rtol=1e-5, atol=1e-5)


def test_official_130m_shapes():
    """The released state-spaces/mamba2-130m: 219 keys, 128.99M parameters, the shapes our model has."""
    shapes = official_shapes(768, 24, 50277, d_state=128, headdim=64, ngroups=1)
    assert len(shapes) == 219
    n_params = sum(torch.Size(s).numel() for k, s in shapes.items() if k != "lm_head.weight")  # tied
    assert round(n_params / 1e6, 2) == 128.99
    with torch.device("meta"):
        model = MambaLM(MambaConfig(d_model=768, n_layer=24, vocab_size=50277, pad_vocab_size_multiple=16))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
