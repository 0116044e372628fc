"""`gorgon serve` / `python -m server` flags and their GORGON_* environment mirrors."""
import subprocess
import sys

import pytest

from server.cli import SERVE_OPTIONS, build_parser, engine_config, env_name


def parse(argv, monkeypatch, **env):
    for key in [k for k in __import__("os").environ if k.startswith("GORGON_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return build_parser().parse_args(["serve", *argv])


def test_defaults_come_from_engine_config(monkeypatch):
    args = parse([], monkeypatch)
    config = engine_config(args)
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
    assert config.speculation and config.max_num_seqs == 64 and config.model is None


def test_environment_mirrors_every_flag(monkeypatch):
    env = {"GORGON_PORT": "9001", "GORGON_MAX_NUM_SEQS": "3", "GORGON_NO_SPECULATION": "1",
           "GORGON_API_KEY": "k", "GORGON_KV_CACHE_MEMORY": "0.5", "GORGON_MODEL": "", "GORGON_TREE_BUDGET": "8"}
    args = parse([], monkeypatch, **env)
    config = engine_config(args)
    assert args.port == 9001 and args.api_key == "k"
    assert config.max_num_seqs == 3 and not config.speculation and config.kv_cache_memory_gb == 0.5
    assert config.model is None and config.tree_budget == 8
    assert engine_config(parse([], monkeypatch, GORGON_INT8_LINEAR="1")).int8_linear
    assert not engine_config(parse([], monkeypatch, GORGON_INT8_LINEAR="0")).int8_linear
    assert config.cuda_graphs and not engine_config(parse([], monkeypatch, GORGON_CUDA_GRAPHS="0")).cuda_graphs
    assert not engine_config(parse(["--no-cuda-graphs"], monkeypatch)).cuda_graphs
    assert {env_name(flag[2:].replace("-", "_")) for flag, *_ in SERVE_OPTIONS} >= {
        "GORGON_HOST", "GORGON_PORT", "GORGON_MODEL", "GORGON_HEADS", "GORGON_API_KEY", "GORGON_MAX_NUM_SEQS",
        "GORGON_MAX_MODEL_LEN", "GORGON_MAX_QUEUE_SIZE", "GORGON_DTYPE", "GORGON_DEVICE", "GORGON_LOG_LEVEL"}


def test_int8_linear_is_on_by_default_where_the_cpu_runs_it(monkeypatch):
    from models.packed_linear import int8_supported
    assert engine_config(parse([], monkeypatch)).int8_linear == int8_supported()
    assert not engine_config(parse(["--no-int8-linear"], monkeypatch)).int8_linear
    assert not engine_config(parse(["--dtype", "bfloat16"], monkeypatch)).int8_linear   # fp32 only
    assert not engine_config(parse([], monkeypatch, GORGON_DEVICE="cuda:0")).int8_linear   # the CPU only
    assert not engine_config(parse(["--no-int8-linear"], monkeypatch, GORGON_INT8_LINEAR="1")).int8_linear
    # the integer products keep speculation exact only beside the batch-invariant CPU attention
    assert not engine_config(parse(["--attention-backend", "torch"], monkeypatch)).int8_linear
    with pytest.raises(ValueError, match="attention_backend auto"):
        engine_config(parse(["--int8-linear", "--attention-backend", "torch"], monkeypatch))


def test_flags_win_over_the_environment(monkeypatch):
    args = parse(["--port", "7000", "--max-num-seqs", "5"], monkeypatch, GORGON_PORT="9001", GORGON_MAX_NUM_SEQS="3")
    assert args.port == 7000 and args.max_num_seqs == 5


def test_bad_values_are_refused(monkeypatch):
    with pytest.raises(SystemExit):
        parse([], monkeypatch, GORGON_PORT="eighty")
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine_config(parse(["--max-num-seqs", "0"], monkeypatch))
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        engine_config(parse(["--kv-cache-dtype", "float16", "--dtype", "bfloat16"], monkeypatch))
    assert engine_config(parse(["--kv-cache-dtype", "float16"], monkeypatch)).kv_cache_dtype == "float16"
    with pytest.raises(ValueError, match="int8_linear .* float32"):
        engine_config(parse(["--int8-linear", "--dtype", "bfloat16"], monkeypatch))


def test_python_dash_m_server_is_serve():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--no-speculation" in out.stdout and "GORGON_PORT" in out.stdout


def test_a_bad_log_level_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "server", "--log-level", "loud"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "--log-level must be one of" in out.stderr
