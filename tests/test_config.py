"""agent.config: defaults, every validator's message, the reference file, writing defaults."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import string
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import given
from hypothesis import strategies as st

from agent.config import (
    DEFAULT_CONFIG_PATH,
    ID_PATTERN,
    ID_RE,
    SECTIONS,
    AgentSettings,
    Config,
    MqttConfig,
    NodeConfig,
    OutboxConfig,
    RuntimeConfig,
    config_to_dict,
    effective_client_id,
    is_valid_id,
    load_config,
    parse_config,
    render_default_config,
    write_default_config,
)
from agent.errors import ConfigError

REFERENCE = Path(__file__).resolve().parent.parent / "config" / "agent.toml"
SOURCE = "agent.toml"


def parse(**sections: dict[str, Any]) -> Config:
    """parse_config with node.id = "gw-01" unless [node] is given."""
    data: dict[str, Any] = {"node": {"id": "gw-01"}, **sections}
    return parse_config(data, SOURCE)


def problem(**sections: dict[str, Any]) -> str:
    """The ConfigError message parse() raises for these sections."""
    with pytest.raises(ConfigError) as info:
        parse(**sections)
    return str(info.value)


# --- defaults and the reference file


def test_defaults() -> None:
    cfg = parse()
    assert cfg == Config(node=NodeConfig(id="gw-01"))
    assert cfg.node == NodeConfig(id="gw-01", name="gw-01", location="", capabilities=())
    assert cfg.mqtt.client_id == "edge-agent-gw-01"
    assert dataclasses.replace(cfg.mqtt, client_id="") == MqttConfig()
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.topic_prefix) == ("127.0.0.1", 1883, "edge")
    assert (cfg.mqtt.keepalive, cfg.mqtt.protocol, cfg.mqtt.tls) == (30, "auto", False)
    assert (cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s) == (0.5, 60.0)
    assert (cfg.mqtt.session_expiry_s, cfg.mqtt.connect_timeout_s) == (3600, 10.0)
    assert cfg.agent == AgentSettings(
        state_dir="/var/lib/edge-agent",
        heartbeat_interval_s=30.0,
        max_payload_bytes=262144,
        log_level="info",
        shutdown_grace_s=10.0,
        dedupe_window_s=600.0,
        record_accepted_after_s=1.0,
        commit_delay_ms=1.0,
        durability="normal",
    )
    assert cfg.runtime == RuntimeConfig(
        default_memory_mb=128,
        max_memory_mb=1024,
        default_timeout_s=30.0,
        max_timeout_s=900.0,
        max_workers=8,
        prestart=1,
        max_queue=64,
        worker_user="",
        worker_max_invocations=10000,
        max_bundle_bytes=52428800,
        max_bundle_files=10000,
    )
    assert cfg.outbox == OutboxConfig(max_messages=10000, max_bytes=67108864)
    assert DEFAULT_CONFIG_PATH == "/etc/edge-agent/agent.toml"


def test_config_is_frozen() -> None:
    cfg = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mqtt.port = 1  # type: ignore[misc]


def test_every_key_has_a_converter_and_a_comment() -> None:
    assert list(SECTIONS) == [f.name for f in dataclasses.fields(Config)]
    for section in dataclasses.fields(Config):
        assert section.metadata["doc"]
        for spec in dataclasses.fields(SECTIONS[section.name]):
            assert callable(spec.metadata["convert"]), f"{section.name}.{spec.name}"
            assert spec.metadata["doc"].strip(), f"{section.name}.{spec.name}"


def test_reference_file_loads_and_covers_every_field() -> None:
    """config/agent.toml once fell behind the code; it must list every key of every section."""
    raw = tomllib.loads(REFERENCE.read_text(encoding="utf-8"))
    for section in dataclasses.fields(Config):
        assert section.name in raw, f"[{section.name}] missing from {REFERENCE}"
        for spec in dataclasses.fields(SECTIONS[section.name]):
            assert spec.name in raw[section.name], f"{section.name}.{spec.name} missing"
    cfg = load_config(REFERENCE)
    assert cfg == Config(node=NodeConfig(id="gw-01"))


def test_reference_file_is_the_rendered_default() -> None:
    """Comments in config/agent.toml must not drift from the schema's documentation."""
    assert REFERENCE.read_text(encoding="utf-8") == render_default_config(), (
        "regenerate: uv run python -c 'import sys; from agent.config import "
        "render_default_config as r; sys.stdout.write(r())' > config/agent.toml"
    )


def test_render_default_config_parses_back_to_the_defaults() -> None:
    text = render_default_config()
    cfg = parse_config(tomllib.loads(text), "rendered")
    assert cfg == Config(node=NodeConfig(id="gw-01"))
    assert parse_config(config_to_dict(cfg)) == cfg
    for line in text.splitlines()[3:]:
        assert not line or line.startswith(("#", "[")) or " = " in line


def test_render_default_config_comments_every_key() -> None:
    lines = render_default_config().splitlines()
    settings = [i for i, line in enumerate(lines) if " = " in line and not line.startswith("#")]
    assert len(settings) == sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())
    for i in settings:
        assert lines[i - 1].startswith("# "), lines[i]


def test_render_default_config_keeps_client_id_and_name_unpinned() -> None:
    """A copied default file pinned client_id to the example node, so two gateways collided."""
    raw = tomllib.loads(render_default_config(node_id="gw-07"))
    assert raw["node"] == {"id": "gw-07", "name": "", "location": "", "capabilities": []}
    assert raw["mqtt"]["client_id"] == ""


def test_reference_explains_durability() -> None:
    lines = render_default_config().splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("durability = "))
    start = max(i for i in range(end) if not lines[i].startswith("#")) + 1
    words = " ".join(line.lstrip("# ") for line in lines[start:end])
    for phrase in ("synchronous=NORMAL", "kill -9", "power loss", "synchronous=FULL", "fsyncs"):
        assert phrase in words, phrase


def test_render_default_config_rejects_a_bad_node_id() -> None:
    with pytest.raises(ConfigError, match=r'node\.id: expected an id .*, got "gw\.01"'):
        render_default_config(node_id="gw.01")


def test_config_to_dict_round_trips_a_non_default_config() -> None:
    cfg = parse(
        node={"id": "n1", "name": "Line 4", "capabilities": ["gpio", "camera"]},
        mqtt={"protocol": 5, "tls": True, "cert_file": "/c.pem", "key_file": "/k.pem"},
        agent={"heartbeat_interval_s": 5, "durability": "full"},
        runtime={"prestart": 0, "worker_user": "edge-fn"},
    )
    data = config_to_dict(cfg)
    assert data["mqtt"]["client_id"] == "edge-agent-n1"
    assert data["node"]["capabilities"] == ["gpio", "camera"]

    def values(tree: Any) -> list[Any]:
        return [v for x in tree.values() for v in values(x)] if isinstance(tree, dict) else [tree]

    assert None not in values(data)
    assert parse_config(tomllib.loads(tomli_w.dumps(data))) == cfg


# --- names and ids


def test_name_defaults_to_id_and_explicit_name_is_kept() -> None:
    assert parse(node={"id": "gw-01"}).node.name == "gw-01"
    assert parse(node={"id": "gw-01", "name": "Roof gateway"}).node.name == "Roof gateway"


def test_client_id_explicit_or_computed() -> None:
    assert parse(mqtt={"client_id": "broker-given"}).mqtt.client_id == "broker-given"
    assert effective_client_id("gw-01") == "edge-agent-gw-01"
    assert effective_client_id("gw-01", "x") == "x"


@pytest.mark.parametrize("bad", ["gw.01", "a b", "+", "#", "", "x" * 65, "-gw", "_gw", "gw/1"])
def test_bad_node_ids(bad: str) -> None:
    message = problem(node={"id": bad})
    shown = '"' + bad + '"'
    assert message.startswith(f"{SOURCE}: node.id: expected an id of 1-64 letters"), message
    assert message.endswith(f"got {shown}"), message


def test_node_id_must_be_a_string() -> None:
    assert problem(node={"id": 7}).endswith(
        "node.id: expected an id of 1-64 letters, digits, '_' or '-' starting with a letter "
        f"or digit ({ID_PATTERN}), got 7"
    )


@pytest.mark.parametrize("good", ["a", "0", "x" * 64, "gw_01-A", "GW-01"])
def test_good_node_ids(good: str) -> None:
    assert parse(node={"id": good}).node.id == good


def test_id_with_trailing_newline_is_rejected() -> None:
    """``$`` matches before a final newline, so ID_RE.match accepted "gw-01\\n"."""
    assert ID_RE.match("gw-01\n") is not None  # the trap is real...
    assert not is_valid_id("gw-01\n")  # ...and is_valid_id / the config avoid it
    assert "node.id: expected an id" in problem(node={"id": "gw-01\n"})


_ID_CHARS = string.ascii_letters + string.digits + "_-"


def _id_oracle(value: str) -> bool:
    """The id rule written without a regex, to check ID_PATTERN as well as the validator."""
    return 1 <= len(value) <= 64 and value[0] in _ID_CHARS[:62] and set(value) <= set(_ID_CHARS)


@given(
    st.one_of(
        st.text(alphabet=_ID_CHARS + ". +#/\n\x00é٣\uff21K", max_size=70),
        st.from_regex(ID_PATTERN, fullmatch=True),
        st.text(max_size=70),
    )
)
def test_id_valid_iff_it_matches_the_pattern(value: str) -> None:
    expected = _id_oracle(value)
    assert (re.fullmatch(ID_PATTERN, value) is not None) == expected
    try:
        parse(node={"id": value})
    except ConfigError as exc:
        assert not expected, str(exc)
        assert str(exc).startswith(f"{SOURCE}: node.id: expected an id")
    else:
        assert expected


def test_missing_node_id() -> None:
    cases: list[dict[str, Any]] = [{}, {"node": {}}, {"node": {"name": "x"}}]
    for data in cases:
        with pytest.raises(ConfigError) as info:
            parse_config(data, SOURCE)
        assert str(info.value) == f"{SOURCE}: node.id: required, but missing from [node]"


# --- per-type validators: every message names the dotted key and the bad value


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("mqtt", "keepalive", "ten", 'expected an integer from 5 to 3600, got "ten"'),
        ("mqtt", "keepalive", 4, "expected an integer from 5 to 3600, got 4"),
        ("mqtt", "keepalive", 3601, "expected an integer from 5 to 3600, got 3601"),
        ("mqtt", "keepalive", 30.0, "expected an integer from 5 to 3600, got 30.0"),
        ("mqtt", "port", 0, "expected an integer from 1 to 65535, got 0"),
        ("mqtt", "port", 65536, "expected an integer from 1 to 65535, got 65536"),
        ("mqtt", "port", True, "expected an integer from 1 to 65535, got true"),
        ("mqtt", "session_expiry_s", -1, "expected an integer from 0 to 4294967295, got -1"),
        ("mqtt", "session_expiry_s", 2**32, "expected an integer from 0 to 4294967295, got "),
        ("mqtt", "reconnect_min_s", 0, "expected a positive number, got 0"),
        ("mqtt", "reconnect_min_s", "1s", 'expected a positive number, got "1s"'),
        ("mqtt", "connect_timeout_s", float("inf"), "expected a positive number, got inf"),
        ("mqtt", "connect_timeout_s", float("nan"), "expected a positive number, got nan"),
        ("mqtt", "connect_timeout_s", False, "expected a positive number, got false"),
        ("mqtt", "host", "", 'expected a non-empty string without whitespace, got ""'),
        ("mqtt", "host", "broker .lan", 'without whitespace, got "broker .lan"'),
        ("mqtt", "host", 10, "expected a non-empty string without whitespace, got 10"),
        ("mqtt", "username", ["u"], 'expected a string, got ["u"]'),
        ("mqtt", "client_id", "a b", 'expected a string without whitespace, got "a b"'),
        ("mqtt", "password_file", 3, "expected a path, got 3"),
        ("mqtt", "ca_file", "/x\x00y", 'without control characters, got "/x\\u0000y"'),
        ("mqtt", "protocol", 3, 'expected one of "auto", "5", "3.1.1", got 3'),
        ("mqtt", "protocol", "3", 'expected one of "auto", "5", "3.1.1", got "3"'),
        ("mqtt", "protocol", 5.0, 'expected one of "auto", "5", "3.1.1", got 5.0'),
        ("mqtt", "protocol", True, 'expected one of "auto", "5", "3.1.1", got true'),
        ("mqtt", "tls", "yes", 'expected true or false, got "yes"'),
        ("mqtt", "tls", "true", 'expected true or false, got "true"'),
        ("mqtt", "tls", 1, "expected true or false, got 1"),
        ("mqtt", "tls_insecure", "false", 'expected true or false, got "false"'),
        ("mqtt", "username", "a\nb", 'expected a string without control characters, got "a\\nb"'),
        ("agent", "state_dir", "", 'expected a non-empty path, got ""'),
        ("agent", "heartbeat_interval_s", 0.5, "expected a number >= 1, got 0.5"),
        ("agent", "max_payload_bytes", 1023, "expected an integer from 1024 to 268435455, got"),
        ("agent", "log_level", "verbose", 'expected one of "debug", "info", "warning", "error"'),
        ("agent", "log_level", "INFO", 'got "INFO"'),
        ("agent", "durability", "extra", 'expected "normal" or "full", got "extra"'),
        ("agent", "shutdown_grace_s", -1, "expected a non-negative number, got -1"),
        ("agent", "dedupe_window_s", "10m", 'expected a non-negative number, got "10m"'),
        ("runtime", "max_workers", 0, "expected a positive integer, got 0"),
        ("runtime", "prestart", 17, "expected an integer from 0 to 16, got 17"),
        ("runtime", "max_queue", "64", 'expected a positive integer, got "64"'),
        ("runtime", "worker_user", "edge fn", 'without whitespace, got "edge fn"'),
        ("runtime", "default_timeout_s", 0, "expected a positive number, got 0"),
        ("runtime", "max_bundle_files", -5, "expected a positive integer, got -5"),
        ("outbox", "max_messages", 0, "expected a positive integer, got 0"),
        ("outbox", "max_bytes", {"a": 1}, "expected a positive integer, got a table"),
    ],
)
def test_bad_values_name_the_key_and_the_value(
    section: str, key: str, value: Any, message: str
) -> None:
    text = problem(**{section: {key: value}})
    assert text.startswith(f"{SOURCE}: {section}.{key}: "), text
    assert message in text, text
    assert "\n" not in text


def test_keepalive_message_in_full() -> None:
    assert problem(mqtt={"keepalive": "ten"}) == (
        'agent.toml: mqtt.keepalive: expected an integer from 5 to 3600, got "ten"'
    )


def test_numbers_accept_integers_and_return_floats() -> None:
    cfg = parse(mqtt={"reconnect_max_s": 60, "connect_timeout_s": 3}, agent={"dedupe_window_s": 0})
    assert cfg.mqtt.reconnect_max_s == 60.0 and isinstance(cfg.mqtt.reconnect_max_s, float)
    assert isinstance(cfg.mqtt.connect_timeout_s, float)
    assert cfg.agent.dedupe_window_s == 0.0


def test_range_edges_are_accepted() -> None:
    cfg = parse(
        mqtt={"keepalive": 5, "port": 65535, "session_expiry_s": 2**32 - 1},
        agent={"max_payload_bytes": 1024, "heartbeat_interval_s": 1},
        runtime={"prestart": 0},
    )
    assert (cfg.mqtt.keepalive, cfg.mqtt.port, cfg.mqtt.session_expiry_s) == (5, 65535, 2**32 - 1)
    assert parse(mqtt={"keepalive": 3600}).mqtt.keepalive == 3600


@pytest.mark.parametrize(("raw", "expected"), [(5, "5"), ("5", "5"), ("3.1.1", "3.1.1")])
def test_protocol_accepts_integer_5_and_strings(raw: Any, expected: str) -> None:
    assert parse(mqtt={"protocol": raw}).mqtt.protocol == expected


def test_long_values_are_cut_short_in_messages() -> None:
    text = problem(mqtt={"host": "x " * 200})
    assert text.endswith("...") and len(text) < 200


def test_capabilities() -> None:
    assert parse(node={"id": "n", "capabilities": ["gpio", "cam"]}).node.capabilities == (
        "gpio",
        "cam",
    )
    cases = {
        "gpio": 'node.capabilities: expected a list of strings, got "gpio"',
        ("gpio", 1): "node.capabilities[1]: expected a non-empty string without whitespace, got 1",
        ("",): 'node.capabilities[0]: expected a non-empty string without whitespace, got ""',
        ("has space",): "node.capabilities[0]: expected a non-empty string without whitespace",
        ("a", "a"): 'node.capabilities[1]: duplicate entry, got "a"',
    }
    for value, message in cases.items():
        raw = list(value) if isinstance(value, tuple) else value
        text = problem(node={"id": "n", "capabilities": raw})
        assert text.startswith(f"{SOURCE}: {message}"), text


# --- topic prefix


@pytest.mark.parametrize("good", ["edge", "acme/edge", "acme/prod/edge-1", "é"])
def test_good_topic_prefixes(good: str) -> None:
    assert parse(mqtt={"topic_prefix": good}).mqtt.topic_prefix == good


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", 'expected a non-empty topic prefix, got ""'),
        (5, "expected a non-empty topic prefix, got 5"),
        ("edge/+", 'must not contain the wildcards "+" or "#", got "edge/+"'),
        ("#", 'must not contain the wildcards "+" or "#", got "#"'),
        ("a+b", 'must not contain the wildcards "+" or "#", got "a+b"'),
        ("/edge", 'must not start or end with "/", got "/edge"'),
        ("edge/", 'must not start or end with "/", got "edge/"'),
        ("/", 'must not start or end with "/", got "/"'),
        ("a//b", 'must not contain an empty level ("//"), got "a//b"'),
        ("a\x00b", 'must not contain NUL, got "a\\u0000b"'),
        ("$SYS", 'must not start with "$" (reserved for the broker), got "$SYS"'),
    ],
)
def test_bad_topic_prefixes(bad: Any, message: str) -> None:
    assert problem(mqtt={"topic_prefix": bad}) == f"{SOURCE}: mqtt.topic_prefix: {message}"


# --- rules that tie keys together


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_tls_files_need_tls(key: str) -> None:
    text = problem(mqtt={key: "/etc/edge-agent/x.pem"})
    assert f"{SOURCE}: mqtt.tls: must be true when mqtt.{key} is set, got false" in text


def test_tls_insecure_needs_tls() -> None:
    text = problem(mqtt={"tls_insecure": True})
    assert text == f"{SOURCE}: mqtt.tls: must be true when mqtt.tls_insecure is set, got false"


def test_cert_and_key_both_or_neither() -> None:
    assert problem(mqtt={"tls": True, "cert_file": "/c.pem"}) == (
        f'{SOURCE}: mqtt.key_file: must be set together with mqtt.cert_file, got ""'
    )
    assert problem(mqtt={"tls": True, "key_file": "/k.pem"}) == (
        f'{SOURCE}: mqtt.cert_file: must be set together with mqtt.key_file, got ""'
    )


def test_good_tls_combinations() -> None:
    assert parse(mqtt={"tls": True}).mqtt.tls
    assert parse(mqtt={"tls": True, "ca_file": "/ca.pem"}).mqtt.ca_file == "/ca.pem"
    both = {"tls": True, "cert_file": "/c.pem", "key_file": "/k.pem", "tls_insecure": True}
    assert parse(mqtt=both).mqtt.key_file == "/k.pem"


def test_reconnect_max_not_below_min() -> None:
    assert problem(mqtt={"reconnect_min_s": 5, "reconnect_max_s": 1}) == (
        f"{SOURCE}: mqtt.reconnect_max_s: expected a number >= mqtt.reconnect_min_s (5), got 1.0"
    )
    assert parse(mqtt={"reconnect_min_s": 5, "reconnect_max_s": 5}).mqtt.reconnect_max_s == 5.0


def test_password_without_username_only_fails_on_3_1_1() -> None:
    assert parse(mqtt={"password_file": "/etc/edge-agent/pw"}).mqtt.username == ""
    text = problem(mqtt={"protocol": "3.1.1", "password_file": "/etc/edge-agent/pw"})
    assert text.startswith(f"{SOURCE}: mqtt.username: MQTT 3.1.1 needs a user name"), text


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        (
            {"default_memory_mb": 2048},
            "runtime.default_memory_mb: expected at most runtime.max_memory_mb (1024), got 2048",
        ),
        (
            {"default_timeout_s": 60, "max_timeout_s": 30},
            "runtime.default_timeout_s: expected at most runtime.max_timeout_s (30.0), got 60.0",
        ),
        (
            {"prestart": 4, "max_workers": 2},
            "runtime.prestart: expected at most runtime.max_workers (2), got 4",
        ),
    ],
)
def test_runtime_defaults_within_maxima(runtime: dict[str, Any], message: str) -> None:
    assert problem(runtime=runtime) == f"{SOURCE}: {message}"


def test_outbox_holds_at_least_one_payload() -> None:
    assert problem(outbox={"max_bytes": 1000}) == (
        f"{SOURCE}: outbox.max_bytes: expected at least agent.max_payload_bytes (262144), got 1000"
    )


# --- unknown keys and sections


def test_unknown_key_with_hint() -> None:
    assert problem(mqtt={"hots": "x"}) == (
        f"{SOURCE}: mqtt.hots: unknown key (did you mean mqtt.host?)"
    )


def test_unknown_key_without_hint() -> None:
    assert problem(agent={"zzz": 1}) == f"{SOURCE}: agent.zzz: unknown key"


def test_unknown_section_with_hint() -> None:
    assert problem(mqqt={"host": "x"}) == (
        f"{SOURCE}: mqqt: unknown section (did you mean [mqtt]?)"
    )
    assert problem(plugins={"a": 1}) == f"{SOURCE}: plugins: unknown section"


def test_top_level_key_suggests_its_section() -> None:
    """A key written above its [section] header reads as a top-level key."""
    with pytest.raises(ConfigError) as info:
        parse_config({"node": {"id": "n"}, "keepalive": 10}, SOURCE)
    assert str(info.value) == f"{SOURCE}: keepalive: unknown key (did you mean mqtt.keepalive?)"


def test_section_that_is_not_a_table() -> None:
    assert problem(mqtt=5) == f"{SOURCE}: mqtt: expected a table [mqtt], got 5"  # type: ignore[arg-type]


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^<config>: expected a table of sections, got 5$"):
        parse_config(5)  # type: ignore[arg-type]


def test_all_problems_are_reported_together() -> None:
    text = problem(mqtt={"hots": "x", "port": 0}, agent={"log_level": "loud"})
    lines = text.splitlines()
    assert len(lines) == 3, text
    assert all(line.startswith(f"{SOURCE}: ") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {"mqtt.hots", "mqtt.port", "agent.log_level"}


# --- files


def test_load_config_from_str_and_path(tmp_path: Path) -> None:
    target = tmp_path / "agent.toml"
    target.write_text('[node]\nid = "gw-02"\n\n[mqtt]\nprotocol = 5\nkeepalive = 60\n')
    for where in (target, str(target)):
        cfg = load_config(where)
        assert (cfg.node.id, cfg.mqtt.protocol, cfg.mqtt.keepalive) == ("gw-02", "5", 60)


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    target = tmp_path / "agent.toml"
    target.write_text('[node]\nid = "gw-02"\n[mqtt]\nkeepalive = "ten"\n')
    with pytest.raises(ConfigError) as info:
        load_config(target)
    assert str(info.value) == (
        f'{target}: mqtt.keepalive: expected an integer from 5 to 3600, got "ten"'
    )


def test_toml_syntax_error_is_a_config_error_with_the_line(tmp_path: Path) -> None:
    target = tmp_path / "agent.toml"
    target.write_text('[node]\nid = "gw-02"\nname = \n')
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 3") as info:
        load_config(target)
    assert str(info.value).startswith(f"{target}: ")
    assert isinstance(info.value.__cause__, tomllib.TOMLDecodeError)


def test_missing_file_and_bad_encoding_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        load_config(tmp_path / "nope.toml")
    target = tmp_path / "latin1.toml"
    target.write_bytes(b'[node]\nid = "gw"\nlocation = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"not UTF-8 text"):
        load_config(target)


def test_utf8_bom_is_tolerated(tmp_path: Path) -> None:
    target = tmp_path / "agent.toml"
    target.write_bytes(b'\xef\xbb\xbf[node]\nid = "gw-03"\n')
    assert load_config(target).node.id == "gw-03"


def test_write_default_config_writes_a_loadable_0640_file(tmp_path: Path) -> None:
    target = tmp_path / "agent.toml"
    write_default_config(target, node_id="gw-09")
    assert target.read_text(encoding="utf-8") == render_default_config("gw-09")
    assert load_config(target) == Config(node=NodeConfig(id="gw-09"))
    assert stat.S_IMODE(os.stat(target).st_mode) & ~0o640 == 0


def test_write_default_config_refuses_to_overwrite(tmp_path: Path) -> None:
    """write_default_config must never clobber an operator's edited config."""
    target = tmp_path / "agent.toml"
    target.write_text("# mine\n")
    with pytest.raises(FileExistsError):
        write_default_config(target)
    assert target.read_text() == "# mine\n"


def test_write_default_config_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    """A symlink planted at the config path must not redirect the write."""
    link = tmp_path / "agent.toml"
    link.symlink_to(tmp_path / "elsewhere.toml")
    with pytest.raises(FileExistsError):
        write_default_config(link)
    assert not (tmp_path / "elsewhere.toml").exists()


# --- [trust]


def test_trust_defaults_to_no_keys_and_signatures_required_once_keys_exist() -> None:
    trust = parse().trust
    assert trust.keys == () and trust.require_signed is True


def test_trust_keys_are_distinct_absolute_paths() -> None:
    cfg = parse(trust={"keys": ["/etc/edge-agent/trust/a.pub", "/etc/edge-agent/trust/b.pub"]})
    assert cfg.trust.keys == ("/etc/edge-agent/trust/a.pub", "/etc/edge-agent/trust/b.pub")
    assert "trust.keys[0]: expected an absolute path" in problem(trust={"keys": ["a.pub"]})
    assert "trust.keys[1]: duplicate entry" in problem(trust={"keys": ["/k", "/k"]})
    assert "trust.keys: expected a list of absolute paths" in problem(trust={"keys": "/k"})
    assert "trust.require_signed: expected true or false" in problem(
        trust={"require_signed": "yes"}
    )
