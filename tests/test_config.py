"""Configuration: defaults, YAML, ISOSCOPE_* overrides, flags, and one-line errors naming the key."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from isoscope.config import Config, ConfigError, load_config


def test_defaults_match_the_output_contract() -> None:
    cfg = load_config(env={})
    assert cfg.receivers.otlp_grpc.listen == "127.0.0.1:4317"
    assert cfg.receivers.otlp_http.listen == "127.0.0.1:4318"
    assert cfg.metrics.listen == "127.0.0.1:9464"
    assert cfg.exporters.file.path == "./isoscope-data/traces.jsonl"
    assert cfg.attribution.min_stall_ms == 1.0 and cfg.attribution.max_child_spans == 16
    assert cfg.file_export_enabled()


def test_file_export_is_off_when_forwarding_unless_asked() -> None:
    assert not load_config(env={}, overrides={"exporters.forward": ["grpc://127.0.0.1:1"]}).file_export_enabled()
    cfg = load_config(env={}, overrides={"exporters.forward": ["grpc://127.0.0.1:1"],
                                         "exporters.file.enabled": True})
    assert cfg.file_export_enabled()


def test_precedence_file_then_env_then_flags(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("attribution:\n  min_stall_ms: 3\n  max_child_spans: 4\nmetrics:\n  listen: 127.0.0.1:1\n")
    env = {"ISOSCOPE_ATTRIBUTION__MIN_STALL_MS": "5", "ISOSCOPE_PROBES__DISABLED": "[kvm, netns]"}
    cfg = load_config(f, env=env, overrides={"metrics.listen": "127.0.0.1:2"})
    assert cfg.attribution.min_stall_ms == 5          # env beats file
    assert cfg.attribution.max_child_spans == 4       # file beats default
    assert cfg.metrics.listen == "127.0.0.1:2"        # flag beats file
    assert cfg.probes.disabled == ["kvm", "netns"]    # env values are YAML scalars


def test_config_file_from_environment(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("log_level: debug\n")
    assert load_config(env={"ISOSCOPE_CONFIG": str(f)}).log_level == "debug"


@pytest.mark.parametrize("text, key", [
    ("attribution:\n  bogus: 1\n", "attribution.bogus: unknown key"),
    ("attribution:\n  min_stall_ms: fast\n", "attribution.min_stall_ms"),
    ("receivers:\n  otlp_grpc:\n    listen: nohost\n", "receivers.otlp_grpc.listen"),
    ("exporters:\n  forward: [ftp://x:1]\n", "exporters.forward"),
    ("attribution:\n  blame_threshold: 2\n", "attribution.blame_threshold"),
    ("log_level: loud\n", "log_level"),
])
def test_bad_values_name_the_key_on_one_line(tmp_path, text: str, key: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, env={})
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("receivers: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", env={})
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f, env={})


def test_unknown_environment_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"nosuch: unknown key \[from environment ISOSCOPE_NOSUCH\]"):
        load_config(env={"ISOSCOPE_NOSUCH": "1"})


def test_config_model_rejects_assignment_of_wrong_type() -> None:
    cfg = Config()
    with pytest.raises(Exception):
        cfg.attribution.max_child_spans = "many"  # type: ignore[assignment]


def _run_cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOSCOPE_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "isoscope.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_cli_bad_config_exits_nonzero_with_one_line(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("receivers:\n  otlp_http:\n    max_body_bytes: -5\n")
    res = _run_cli("run", "--config", str(f), "--no-probes")
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert "receivers.otlp_http.max_body_bytes" in lines[0]


def test_cli_unknown_env_key_exits_nonzero() -> None:
    res = _run_cli("run", "--no-probes", env_extra={"ISOSCOPE_RECEIVERS__OTLP_GRPC__PORT": "1"})
    assert res.returncode != 0
    assert "receivers.otlp_grpc.port: unknown key" in res.stderr


def test_cli_port_in_use_exits_nonzero_with_one_line(tmp_path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        res = _run_cli("run", "--no-probes", "--otlp-grpc-listen", f"127.0.0.1:{port}",
                       "--otlp-http-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                       "--file-export", str(tmp_path / "t.jsonl"))
    finally:
        busy.close()
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.startswith("isoscope:")]
    assert len(lines) == 1, res.stderr
    assert "receivers.otlp_grpc.listen" in lines[0] and str(port) in lines[0]


def test_print_config_shows_effective_values() -> None:
    res = _run_cli("run", "--print-config", "--metrics-listen", "127.0.0.1:19999")
    assert res.returncode == 0, res.stderr
    assert "127.0.0.1:19999" in res.stdout
