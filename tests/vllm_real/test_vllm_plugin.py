"""The `vllm.general_plugins` entry point, loaded by vLLM's own `load_general_plugins()`."""

import pytest
import torch

import dsv4_compile
from dsv4_compile.integrations import vllm_plugin
from tests.conftest import reports_since

ARCH = vllm_plugin.ARCHITECTURE


@pytest.fixture
def load_plugins(monkeypatch):
    """vLLM's plugin loading, run afresh; the model registry entry is put back afterwards."""
    import vllm.plugins
    from vllm import ModelRegistry

    monkeypatch.delenv(vllm_plugin.ENABLE_ENV, raising=False)
    monkeypatch.delenv(vllm_plugin.CPU_PORT_ENV, raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    saved = ModelRegistry.models[ARCH]

    def load() -> type[torch.nn.Module]:
        monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
        vllm.plugins.load_general_plugins()
        return ModelRegistry._try_load_model_cls(ARCH)

    yield load
    ModelRegistry.models[ARCH] = saved


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    points = {p.name: p.value for p in entry_points(group="vllm.general_plugins")}
    assert points.get(vllm_plugin.PLUGIN_NAME) == "dsv4_compile.integrations.vllm_plugin:register"


def test_disabled_by_default_leaves_the_cpu_port(load_plugins):
    from vllm import ModelRegistry
    from vllm.models.deepseek_v4.cpu.model import DeepseekV4ForCausalLM as CpuPort

    before = ModelRegistry.models[ARCH]
    assert load_plugins() is CpuPort
    assert ModelRegistry.models[ARCH] is before


@pytest.mark.parametrize("how", ["env", "vllm_plugins"])
def test_enabled_maps_the_architecture_to_the_compiled_nvidia_model(load_plugins, monkeypatch, how):
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM as Nvidia

    if how == "env":
        monkeypatch.setenv(vllm_plugin.ENABLE_ENV, "1")
    else:
        monkeypatch.setenv("VLLM_PLUGINS", f"lora_filesystem_resolver,{vllm_plugin.PLUGIN_NAME}")
    model_class = load_plugins()
    assert issubclass(model_class, Nvidia) and model_class is not Nvidia
    assert model_class.__name__ == "DeepseekV4ForCausalLMNvidiaPath"
    assert model_class is vllm_plugin.DeepseekV4ForCausalLMNvidiaPath


def test_vllm_plugins_without_it_wins_over_the_env(load_plugins, monkeypatch):
    from vllm.models.deepseek_v4.cpu.model import DeepseekV4ForCausalLM as CpuPort

    monkeypatch.setenv(vllm_plugin.ENABLE_ENV, "1")
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    assert load_plugins() is CpuPort


class CudaOnlyModel(torch.nn.Module):
    """Built and run the way CUDA code is: streams at construction, fp32-output mm, a capture check."""

    def __init__(self):
        super().__init__()
        from vllm.model_executor.layers.linear import ReplicatedLinear

        self.aux_stream = torch.cuda.Stream()
        self.proj = ReplicatedLinear(32, 8, bias=False, params_dtype=torch.bfloat16)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(8, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.mm(x, self.proj.weight.T, out_dtype=torch.float32)
        return out if not torch.cuda.is_current_stream_capturing() else -out


def test_wrapper_builds_under_cuda_compat_and_runs_through_dsv4_xpu(vllm_config):
    from dsv4_compile.tools.vllm_layers import init_single_process_distributed

    init_single_process_distributed(vllm_config)
    # CPU torch has no CUDA streams and no aten::mm.dtype kernel
    with pytest.raises((AssertionError, RuntimeError, NotImplementedError)):
        CudaOnlyModel()(torch.randn(3, 32).bfloat16())
    model = vllm_plugin.compiled_under_cuda_compat(CudaOnlyModel, "cpu")()
    assert model.proj._cpu_skip_gemm_dispatch is True
    x = torch.randn(5, 32).bfloat16()
    snapshot = dsv4_compile.all_reports()
    out = model(x)
    assert reports_since(snapshot), "dsv4_xpu did not compile the forward"
    expected = x.double() @ model.proj.weight.detach().double().T
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


def test_registry_class_builds_the_nvidia_model_on_cpu(load_plugins, monkeypatch, tmp_path):
    """Construction only: a forward of the whole model needs caches, metadata and Triton stand-ins that
    vLLM's CPU worker does not provide for the NVIDIA path (see dsv4_compile/tools/vllm_layers.py)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.utils.torch_utils import set_default_torch_dtype

    from dsv4_compile.tools import vllm_layers

    monkeypatch.setenv(vllm_plugin.ENABLE_ENV, "1")
    model_class = load_plugins()
    config = vllm_layers.make_vllm_config(vllm_layers.write_tiny_config(tmp_path))
    vllm_layers.init_single_process_distributed(config)
    with set_current_vllm_config(config), set_default_torch_dtype(torch.bfloat16):
        model = model_class(vllm_config=config, prefix="")
    assert [type(layer.attn).__name__ for layer in model.model.layers] == ["DeepseekV4FlashMLAAttention"] * 3
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert linears and all(m._cpu_skip_gemm_dispatch for m in linears)


def test_enabled_leaves_every_other_architecture_alone(load_plugins, monkeypatch):
    from vllm import ModelRegistry

    before = dict(ModelRegistry.models)
    monkeypatch.setenv(vllm_plugin.ENABLE_ENV, "1")
    load_plugins()
    changed = [arch for arch, entry in ModelRegistry.models.items() if before.get(arch) is not entry]
    assert changed == [ARCH]


def test_cpu_port_switch_maps_the_architecture_to_vllms_cpu_port(load_plugins, monkeypatch):
    from vllm.models.deepseek_v4.cpu.model import DeepseekV4ForCausalLM as CpuPort

    monkeypatch.setenv(vllm_plugin.CPU_PORT_ENV, "1")
    assert load_plugins() is CpuPort
