"""convert-lora: HF and KT adapters -> SGLang PEFT dirs, checked by loading them back with PEFT."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ktflow import cli
from ktflow.atomic import sha256_file
from ktflow.convert_lora.convert import convert_adapter
from ktflow.convert_lora.converters.kt_kernel import load_kt_converter
from ktflow.convert_lora.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FUSED_WEIGHTS, KT_MANIFEST, expert_key
from ktflow.errors import KtflowInputError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RANK, ALPHA = 4, 8
FUSED_NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")


def tiny_config() -> Any:
    return transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        max_position_embeddings=64,
    )  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Callable[[], Any]]:
    """A saved tiny DeepSeek-V3 and a factory for fresh copies of it (PEFT mutates the model)."""
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(tiny_config()).eval()
    state = copy.deepcopy(model.state_dict())
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)

    def fresh() -> Any:
        clone = transformers.DeepseekV3ForCausalLM(tiny_config())
        clone.load_state_dict(state)
        return clone.eval()

    return path, fresh


@pytest.fixture(scope="module")
def hf_adapter(base: tuple[Path, Callable[[], Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF-backend style: LoRA on attention, dense MLP and shared experts (routed experts are fused 3-D)."""
    torch.manual_seed(1)
    # the names LLaMA-Factory's `lora_target: all` expands to (its nn.Linear leaves); PEFT's own
    # "all-linear" also wraps the fused 3-D experts from peft 0.21 on, which SGLang cannot load
    targets = [
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(base[1](), config)
    path = tmp_path_factory.mktemp("hf_adapter")
    model.save_pretrained(path)
    if json.loads((path / ADAPTER_CONFIG).read_text()).get("target_parameters"):
        pytest.skip(
            f"peft {peft.__version__} also puts LoRA on the fused 3-D experts (target_parameters), "
            "which SGLang cannot load; ktflow pins peft 0.18"
        )
    return path


def make_kt_adapter(
    hf_adapter: Path, path: Path, experts: int = 4, hidden: int = 64, inter: int = 32
) -> Path:
    """A KT-backend adapter dir in kt-kernel 0.7.2's format: PEFT part + fused experts + manifest."""
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(2)
    # A: [E, r, in], B: [E, out, r]; gate/up map hidden -> intermediate, down the reverse
    shapes = {
        "gate_lora_a": (experts, RANK, hidden), "gate_lora_b": (experts, inter, RANK),
        "up_lora_a": (experts, RANK, hidden), "up_lora_b": (experts, inter, RANK),
        "down_lora_a": (experts, RANK, inter), "down_lora_b": (experts, hidden, RANK),
    }  # fmt: skip
    fused = {
        f"layers.1.experts.{name}": torch.randn(shape, generator=generator).to(torch.bfloat16)
        for name, shape in shapes.items()
    }
    save_file(fused, str(path / FUSED_WEIGHTS))
    # KT's wrappers leave ".orig_module" in some PEFT keys; the converter strips it
    plain = {
        key.replace(".mlp.shared_experts.", ".mlp.orig_module.shared_experts."): value
        for key, value in load_file(str(hf_adapter / ADAPTER_WEIGHTS)).items()
    }
    save_file(plain, str(path / ADAPTER_WEIGHTS))
    shutil.copy(hf_adapter / ADAPTER_CONFIG, path / ADAPTER_CONFIG)
    write_manifest(path)
    return path


def write_manifest(path: Path, **override: Any) -> None:
    tensors = {
        k: {"shape": list(v.shape), "dtype": "BF16"} for k, v in load_file(str(path / FUSED_WEIGHTS)).items()
    }
    artifacts: dict[str, Any] = {
        name: {"size": (path / name).stat().st_size, "sha256": sha256_file(path / name)}
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FUSED_WEIGHTS)
    }
    artifacts[FUSED_WEIGHTS].update({"tensor_count": len(tensors), "tensors": tensors})
    manifest = {
        "version": 1, "status": "ready", "expert_weight_format": "bf16", "base": {"model_name_or_path": "x"},
        "lora": {"rank": RANK, "alpha": float(ALPHA)}, "artifacts": artifacts, **override,
    }  # fmt: skip
    (path / KT_MANIFEST).write_text(json.dumps(manifest))


def load_converted_with_peft(model: Any, out: Path) -> Any:
    """Apply an SGLang-style dir with PEFT: its config as is, its keys re-prefixed the way PEFT saves them."""
    config = peft.LoraConfig.from_pretrained(str(out))
    wrapped = peft.get_peft_model(model, config)
    state = {f"base_model.model.{k}": v for k, v in load_file(str(out / ADAPTER_WEIGHTS)).items()}
    result = peft.set_peft_model_state_dict(wrapped, state)
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    return wrapped.eval()


def test_hf_adapter_round_trips_through_peft(
    base: tuple[Path, Callable[[], Any]], hf_adapter: Path, tmp_path: Path
) -> None:
    base_dir, fresh = base
    out = tmp_path / "sglang"
    report = convert_adapter(hf_adapter, out, str(base_dir))
    assert (report.implementation, report.backend, report.rank, report.lora_alpha) == (
        "builtin",
        "hf",
        RANK,
        ALPHA,
    )

    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
        RANK,
        ALPHA,
        str(base_dir),
    )
    attention = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    assert set(config["target_modules"]) == attention | {"gate_proj", "up_proj", "down_proj"}
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    original = load_file(str(hf_adapter / ADAPTER_WEIGHTS))
    assert sorted(tensors) == sorted(k.removeprefix("base_model.model.") for k in original)
    assert json.loads((out / "provenance.json").read_text())["step"] == "convert-lora"

    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = fresh()(ids).logits
        reference = peft.PeftModel.from_pretrained(fresh(), str(hf_adapter)).eval()(ids).logits
        converted = load_converted_with_peft(fresh(), out)(ids).logits
    assert (reference - plain).abs().max() > 1e-2, (
        "the adapter must change the logits for this test to mean anything"
    )
    torch.testing.assert_close(converted, reference, rtol=0, atol=1e-6)


def expert_ffn(
    x: torch.Tensor, w: dict[str, torch.Tensor], lora: Callable[[str, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    gate = F.linear(x, w["gate"]) + lora("gate", x)
    up = F.linear(x, w["up"]) + lora("up", x)
    hidden = F.silu(gate) * up
    return F.linear(hidden, w["down"]) + lora("down", hidden)


def test_kt_fused_experts_split_exactly(
    base: tuple[Path, Callable[[], Any]], hf_adapter: Path, tmp_path: Path
) -> None:
    base_dir, fresh = base
    kt_dir = make_kt_adapter(hf_adapter, tmp_path / "kt")
    out = tmp_path / "sglang"
    report = convert_adapter(kt_dir, out, str(base_dir), implementation="builtin")
    assert (report.backend, report.expert_tensor_count, report.manifest_checked) == ("kt", 6 * 4, True)

    fused = load_file(str(kt_dir / FUSED_WEIGHTS))
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    assert not [k for k in tensors if "orig_module" in k or k.startswith("base_model.")]
    for name in FUSED_NAMES:
        proj, _, matrix = name.split("_")
        for expert in range(4):
            split = tensors[expert_key(1, expert, f"{proj}_proj", f"lora_{matrix.upper()}")]
            assert split.dtype == torch.bfloat16
            assert torch.equal(split, fused[f"layers.1.experts.{name}"][expert])
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert {"gate_proj", "up_proj", "down_proj"} <= set(config["target_modules"])

    # per-expert LoRA (what SGLang runs) == fused LoRA (what KT trained), on the base model's own experts
    experts = fresh().model.layers[1].mlp.experts
    inter = experts.down_proj.shape[-1]
    scale = ALPHA / RANK
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    f64 = {k.split(".")[-1]: v.double() for k, v in fused.items()}  # float64: summation order is noise

    def fused_lora(proj: str, h: torch.Tensor) -> torch.Tensor:  # all experts at once: [E, T, out]
        return scale * torch.einsum(
            "etr,eor->eto", torch.einsum("ti,eri->etr", h, f64[f"{proj}_lora_a"]), f64[f"{proj}_lora_b"]
        )

    with torch.no_grad():
        for expert in range(4):
            gate_up = experts.gate_up_proj[expert].double()
            weights = {
                "gate": gate_up[:inter],
                "up": gate_up[inter:],
                "down": experts.down_proj[expert].double(),
            }

            def split_lora(proj: str, h: torch.Tensor, e: int = expert) -> torch.Tensor:
                a = tensors[expert_key(1, e, f"{proj}_proj", "lora_A")].double()
                b = tensors[expert_key(1, e, f"{proj}_proj", "lora_B")].double()
                return scale * F.linear(F.linear(h, a), b)

            def fused_one(proj: str, h: torch.Tensor, e: int = expert) -> torch.Tensor:
                return fused_lora(proj, h)[e]

            with_lora = expert_ffn(x, weights, split_lora)
            torch.testing.assert_close(with_lora, expert_ffn(x, weights, fused_one))
            assert (with_lora - expert_ffn(x, weights, lambda proj, h: torch.zeros(()))).abs().max() > 1e-3


def test_builtin_matches_kt_kernel(
    base: tuple[Path, Callable[[], Any]], hf_adapter: Path, tmp_path: Path
) -> None:
    try:
        load_kt_converter()
    except ImportError as error:
        pytest.skip(f"kt_kernel's converter not loadable here ({error}); the builtin path is tested above")
    kt_dir = make_kt_adapter(hf_adapter, tmp_path / "kt")
    ours = convert_adapter(kt_dir, tmp_path / "builtin", str(base[0]), implementation="builtin")
    theirs = convert_adapter(kt_dir, tmp_path / "kt_kernel", str(base[0]), implementation="kt_kernel")
    assert (ours.implementation, theirs.implementation) == ("builtin", "kt_kernel")
    a, b = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("builtin", "kt_kernel"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    configs = [json.loads((tmp_path / d / ADAPTER_CONFIG).read_text()) for d in ("builtin", "kt_kernel")]
    assert configs[0] == configs[1]


def _drop(path: Path) -> None:
    path.unlink()


def _edit_json(name: str, edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(kt_dir: Path) -> None:
        data = json.loads((kt_dir / name).read_text())
        edit(data)
        (kt_dir / name).write_text(json.dumps(data))

    return apply


def _edit_fused(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(kt_dir: Path) -> None:
        tensors = load_file(str(kt_dir / FUSED_WEIGHTS))
        edit(tensors)
        save_file(tensors, str(kt_dir / FUSED_WEIGHTS))
        write_manifest(kt_dir)  # a consistent manifest, so the fused check itself must catch it

    return apply


@pytest.mark.parametrize(
    ("mutate", "bad_file", "bad_field"),
    [
        pytest.param(lambda d: _drop(d / ADAPTER_WEIGHTS), ADAPTER_WEIGHTS, None, id="no-adapter-weights"),
        pytest.param(_edit_json(ADAPTER_CONFIG, lambda c: c.pop("r")), ADAPTER_CONFIG, "r", id="config-no-r"),
        pytest.param(
            _edit_json(ADAPTER_CONFIG, lambda c: c.update(r=8)), ADAPTER_CONFIG, "r", id="config-r-vs-fused"
        ),
        pytest.param(
            _edit_json(ADAPTER_CONFIG, lambda c: c.update(use_dora=True)),
            ADAPTER_CONFIG,
            "use_dora",
            id="dora",
        ),
        pytest.param(
            _edit_json(ADAPTER_CONFIG, lambda c: c.update(target_parameters=["mlp.experts.gate_up_proj"])),
            ADAPTER_CONFIG,
            "target_parameters",
            id="peft-fused-parameters",
        ),
        pytest.param(
            _edit_fused(
                lambda t: t.update({"layers.1.experts.gate_lora_a": t["layers.1.experts.gate_lora_a"][0]})
            ),
            FUSED_WEIGHTS,
            "layers.1.experts.gate_lora_a",
            id="fused-rank-2",
        ),
        pytest.param(
            _edit_fused(lambda t: t.update({"layers.1.experts.down_lora_b": torch.zeros(4, 65, RANK)})),
            FUSED_WEIGHTS,
            "layers.1.experts.down_lora_b",
            id="fused-bad-hidden",
        ),
        pytest.param(
            _edit_fused(lambda t: t.pop("layers.1.experts.up_lora_b")),
            FUSED_WEIGHTS,
            "layers.1.experts.up_lora_b",
            id="fused-missing-one",
        ),
        pytest.param(
            _edit_fused(
                lambda t: t.update(
                    {"layers.7.experts.gate_lora_a": t["layers.1.experts.gate_lora_a"].clone()}
                )
            ),
            FUSED_WEIGHTS,
            "layers.7.experts.gate_lora_a",
            id="fused-layer-beyond-base",
        ),
        pytest.param(
            lambda d: write_manifest(d, lora={"rank": RANK + 1, "alpha": float(ALPHA)}),
            KT_MANIFEST,
            "lora.rank",
            id="manifest-rank",
        ),
        pytest.param(
            lambda d: (d / ADAPTER_CONFIG).write_text((d / ADAPTER_CONFIG).read_text() + "\n"),
            KT_MANIFEST,
            f"artifacts.{ADAPTER_CONFIG}",
            id="manifest-stale-hash",
        ),
        pytest.param(
            lambda d: write_manifest(d, status="writing"), KT_MANIFEST, "status", id="manifest-not-ready"
        ),
    ],
)
def test_bad_adapter_names_file_and_field(
    base: tuple[Path, Callable[[], Any]],
    hf_adapter: Path,
    tmp_path: Path,
    mutate: Callable[[Path], None],
    bad_file: str,
    bad_field: str | None,
) -> None:
    kt_dir = make_kt_adapter(hf_adapter, tmp_path / "kt")
    mutate(kt_dir)
    with pytest.raises(KtflowInputError) as caught:
        convert_adapter(kt_dir, tmp_path / "out", str(base[0]))
    assert Path(str(caught.value.path)).name == bad_file
    assert caught.value.field == bad_field
    assert not (tmp_path / "out").exists()


def test_lora_alpha_fallback_and_conflict(hf_adapter: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(hf_adapter, adapter)
    _edit_json(ADAPTER_CONFIG, lambda c: c.pop("lora_alpha"))(adapter)
    with pytest.raises(KtflowInputError, match="--lora-alpha") as caught:
        convert_adapter(adapter, tmp_path / "a", "base")
    assert caught.value.field == "lora_alpha"
    assert convert_adapter(adapter, tmp_path / "b", "base", lora_alpha=16).lora_alpha == 16
    assert json.loads((tmp_path / "b" / ADAPTER_CONFIG).read_text())["lora_alpha"] == 16
    with pytest.raises(KtflowInputError, match="conflicts"):
        convert_adapter(hf_adapter, tmp_path / "c", "base", lora_alpha=ALPHA + 1)


def test_cli_converts_and_reports_bad_input(
    hf_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert cli.main(["convert-lora", str(hf_adapter), str(out), "--base-model", "base"]) == 0
    assert json.loads(capsys.readouterr().out)["tensor_count"] == len(load_file(str(out / ADAPTER_WEIGHTS)))
    assert cli.main(["convert-lora", str(hf_adapter), str(hf_adapter / "inside"), "--base-model", "b"]) == 2
    assert "error" in capsys.readouterr().err
    assert (
        cli.main(
            ["convert-lora", str(hf_adapter), str(out), "--base-model", "b", "--implementation", "kt_kernel"]
        )
        == 2
    )


def test_implementations_are_auto_plus_the_converters() -> None:
    from ktflow.convert_lora.converters import CONVERTERS, IMPLEMENTATIONS

    assert IMPLEMENTATIONS == ("auto", "kt_kernel", "builtin")
    assert all(name == converter.name for name, converter in CONVERTERS.items())
