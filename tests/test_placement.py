"""Placement with Accelerate and dtypes: device maps that count Lorsa modules, inputs on the input device, hosts in
bfloat16, training on a dispatched host, and the real SmolLM2 split between CPU and disk."""

import pytest
import torch
import transformers as tf
from accelerate import init_empty_weights
from click.testing import CliRunner

import lorsa_surgery as ls
from lorsa_surgery import LorsaSurgeryError
from lorsa_surgery.cli import main
from lorsa_surgery.host.placement import lorsa_parameter_count, parse_max_memory
from test_splice import FAMILIES, LAYER, sparse_module, tiny

REF = "tests/fixtures/lorsa_reference/a"


def test_max_memory_as_users_write_it():
    assert parse_max_memory("0=20GiB, cpu=60GiB,disk=1TB") == {0: "20GiB", "cpu": "60GiB", "disk": "1TB"}
    assert parse_max_memory({"cpu": "1GB"}) == {"cpu": "1GB"} and parse_max_memory(None) is None
    for bad in ("cpu", "gpu=3GB", "0=lots", ""):
        with pytest.raises(LorsaSurgeryError):
            parse_max_memory(bad)


def test_inputs_go_to_the_execution_device_of_the_embedding():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny("llama")
    assert ls.input_device(model) == torch.device("cpu")
    add_hook_to_module(model.get_input_embeddings(), AlignDevicesHook(execution_device="meta"))  # a stand-in device
    assert ls.input_device(model) == torch.device("meta")


def test_a_device_map_counts_each_lorsa_module_on_its_layer():
    model = tiny("llama")
    lorsa = sparse_module(model)
    assert lorsa_parameter_count(lorsa.cfg) == sum(p.numel() for p in lorsa.parameters())
    with init_empty_weights():
        empty = tf.AutoModelForCausalLM.from_config(model.config)
    # 400 kB of CPU fits the embedding and layers 0-1 (123 kB each) beside Accelerate's reserve, but not layer 1
    # with its 99 kB Lorsa module, which moves with its layer to disk rather than apart from it.
    budget = {"cpu": 400_000, "disk": "1GB"}
    plain = ls.infer_device_map(empty, {}, max_memory=budget)
    counted = ls.infer_device_map(empty, {LAYER: lorsa}, max_memory=budget)
    assert plain["model.layers.1"] == "cpu" and counted["model.layers.1"] == "disk"
    assert not [name for name in counted if "lorsa" in name]
    assert ls.infer_device_map(empty, {LAYER: "from-attention"}, max_memory=budget) == counted  # sized on the empty host
    assert [n for n, _ in empty.model.layers[LAYER].named_children()] == [n for n, _ in model.model.layers[LAYER].named_children()]


@torch.no_grad()
def test_a_module_loads_straight_into_its_dtype_with_float32_rotary():
    reference = ls.Lorsa.from_pretrained(REF)
    half = ls.Lorsa.from_pretrained(REF, dtype=torch.bfloat16)
    assert half.W_Q.dtype == torch.bfloat16 and half.rotary_inv_freq.dtype == torch.float32
    torch.testing.assert_close(half.rotary_inv_freq, reference.rotary_inv_freq, rtol=0, atol=0)
    x = torch.randn(1, 40, 64)
    positions = torch.arange(1000, 1040)[None]  # far positions, where a bfloat16 frequency drifts

    def error() -> float:
        q, q_ref = half.project(x, positions)[0].float(), reference.project(x, positions)[0]
        return float((q - q_ref).norm() / q_ref.norm())

    assert error() < 0.01  # bfloat16 rounding of the projections only (measured 0.004)
    half.rotary_inv_freq = half.rotary_inv_freq.bfloat16()
    assert error() > 0.05  # what a cast frequency table would cost (measured 0.08)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_half_precision_host_exact_is_bit_exact_and_replace_caches_agree(family, dtype):
    model = tiny(family).to(dtype)
    prompt = torch.randint(3, 97, (1, 7))
    plain_logits = model(prompt).logits
    plain = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with ls.splice(model, {LAYER: sparse_module(model)}, mode="exact") as handle:
        assert handle[LAYER].lorsa.W_O.dtype == dtype  # the host's dtype by default
        handle[LAYER].hooks.append(lambda acts, ctx: acts.clone())  # the delta path, adding zero
        assert torch.equal(model(prompt).logits, plain_logits)
        assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0), plain)
    with ls.splice(model, {LAYER: sparse_module(model)}) as handle:
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=False)
        assert torch.equal(cached, uncached)
    with ls.splice(model, {LAYER: sparse_module(model)}, dtype=torch.float32) as handle:
        assert handle[LAYER].lorsa.W_O.dtype == torch.float32 and model(prompt).logits.dtype == dtype


@pytest.mark.slow
def test_training_on_a_dispatched_host_gives_the_same_module(tmp_path, one_torch_thread):
    from test_publish import _tokenizer
    from test_training import assert_same_weights, state, tiny_config

    host = tmp_path / "host"
    tiny("llama").save_pretrained(host)
    _tokenizer().save_pretrained(host)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 95}" for i in range(3000)))
    one = ls.train(tiny_config(host, text, tmp_path / "one", n_heads=64, checkpoint_every=0))[1]
    spread = ls.train(tiny_config(host, text, tmp_path / "spread", n_heads=64, checkpoint_every=0, max_memory="cpu=100KB",
                                  offload_dir=str(tmp_path / "offload")))[1]
    placed, _ = ls.load_model(str(host), max_memory="cpu=100KB", offload_dir=str(tmp_path / "offload"))  # as train loads it
    assert "disk" in placed.hf_device_map.values()
    assert_same_weights(state(one), state(spread), atol=1e-5)
    assert spread.training_info["explained_variance"] == pytest.approx(one.training_info["explained_variance"], abs=1e-4)


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_split_between_cpu_and_disk_runs_as_on_one_device(tmp_path):
    ids = None
    results = {}
    for where in ("one device", "cpu and disk"):
        placement = {} if where == "one device" else {"max_memory": "cpu=300MB", "offload_dir": str(tmp_path / "offload")}
        model, tok = ls.load_model("smollm2", lorsa={3: "from-attention", 25: "from-attention"}, **placement)
        if where == "cpu and disk":
            assert model.hf_device_map["model.layers.3"] == "cpu" and model.hf_device_map["model.layers.25"] == "disk"
        ids = tok("Mary and John went to the market. Mary bought apples and John", return_tensors="pt").input_ids
        modules = {layer: sparse_copy(model, layer) for layer in (3, 25)}
        for mode in ("replace", "exact"):
            with ls.splice(model, modules, mode=mode) as handle:
                edits = ls.InterventionSet([ls.Ablate("L3.H0-63"), ls.Steer("L25.H5", clamp=6.0)])
                plain = model(ids).logits
                with edits.applied(handle):
                    edited = model(ids).logits
                    tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
                results[where, mode] = plain, edited, tokens
    for mode in ("replace", "exact"):
        for one, split in zip(results["one device", mode], results["cpu and disk", mode]):
            assert (one.float() - split.float()).abs().max() <= 1e-5
    assert (results["one device", "exact"][1] - results["one device", "exact"][0]).abs().max() > 1e-2  # the edits act

    cli = CliRunner()
    args = ["generate", "smollm2", "--lorsa", "3=default", "--lorsa", "25=from-attention", "--prompt", "The capital of France is",
            "--max-new-tokens", "8", "--ablate", "L3.H0-63", "--steer", "L25.H5=6"]
    alone = cli.invoke(main, args)
    split = cli.invoke(main, [*args, "--max-memory", "cpu=300MB", "--offload-dir", str(tmp_path / "cli-offload")])
    assert alone.exit_code == 0 and split.exit_code == 0, split.output
    assert split.stdout == alone.stdout and alone.stdout.startswith("The capital of France is")


def sparse_copy(model, layer: int) -> ls.Lorsa:
    lorsa = ls.exact_copy(model, layer)
    lorsa.cfg.act_fn, lorsa.cfg.top_k = "topk", 64
    return lorsa


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none here")
@torch.no_grad()
def test_gpu_and_cpu_split_in_bfloat16(tmp_path):
    import time

    model, tok = ls.load_model("smollm2", dtype="bfloat16", lorsa={3: "default"},
                               device_map={"model.embed_tokens": 0, "model.rotary_emb": 0, **{f"model.layers.{i}": 0 if i < 15 else "cpu"
                                                                                              for i in range(30)},
                                           "model.norm": "cpu", "lm_head": 0})
    ids = tok("The lighthouse keeper climbed the stairs and", return_tensors="pt").input_ids.to(ls.input_device(model))
    plain = model.generate(ids, max_new_tokens=32, do_sample=False)
    with ls.splice(model, {3: ls.module_for(None, 3, "default"), 20: sparse_copy(model, 20)}, mode="exact") as handle:
        handle[3].hooks.append(lambda acts, ctx: acts.clone())
        assert torch.equal(model.generate(ids, max_new_tokens=32, do_sample=False), plain)
    timings = {}
    for name, modules in (("original", None), ("spliced", {3: ls.module_for(None, 3, "default")})):
        handle = ls.splice(model, modules) if modules else None
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        timings[name] = time.perf_counter() - start
        if handle:
            handle.unsplice()
    print(f"\nGPU+CPU bf16 generation, 64 tokens: spliced / original time = {timings['spliced'] / timings['original']:.2f}")
