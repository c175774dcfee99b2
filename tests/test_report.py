"""``isoscope report`` on files the lab produced, and on empty and malformed files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from isoscope_lab import Chain, Fault, HopSpec, send_load
from isoscope.otlpjson import encode_request
from isoscope.report import ReportError, build_traces, load_spans, main_report, parse_lines, report
from tests.otlp_backend import OtlpBackend


@pytest.fixture(scope="module")
def lab_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OTLP/JSON lines of a real two-hop lab chain (throttled second hop), as received by an OTLP backend."""
    path = tmp_path_factory.mktemp("report") / "lab.jsonl"
    with OtlpBackend(grpc_enabled=False) as backend:
        hops = [HopSpec(), HopSpec([Fault("cpu_throttle", quota_pct=20)], work_ms=10)]
        with Chain(hops, otlp_endpoint=backend.http_url + "/v1/traces", service_prefix="rep-hop") as chain:
            load = send_load(chain.entry_url, 3.0)
        assert load.requests > 5 and load.errors == 0
        assert backend.wait_for_spans(2 * load.requests, timeout_s=15)
        path.write_text("".join(encode_request(r) + "\n" for r in backend.requests))
    return path


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=160, color_system=None), buf


@pytest.mark.kernel
def test_report_of_a_lab_file_lists_every_hop_slowest_first(lab_file: Path) -> None:
    spans = load_spans(str(lab_file))
    traces = build_traces(spans)
    assert len(traces) == len({s.trace_id for s in spans})
    durations = [t.duration_ns for t in traces]
    assert durations == sorted(durations, reverse=True)
    for t in traces:
        assert [h.service for h in t.hops] == ["rep-hop0", "rep-hop1"]
        # The hop spans carry their own oracle: the throttled hop's truth is its fault.
        assert t.hops[0].duration_ns >= t.hops[1].duration_ns
    con, buf = _console()
    assert report(str(lab_file), top=2, console=con) == 0
    text = buf.getvalue()
    assert "rep-hop0" in text and "rep-hop1" in text and "L-3" in text
    assert text.count("trace ") >= 2


@pytest.mark.kernel
def test_report_json_and_png(lab_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "out" / "report.png"
    assert main_report([str(lab_file), "--json", "--top", "3", "--png", str(png)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["file"] == str(lab_file)
    assert len(doc["traces"]) == 3
    assert [len(t["hops"]) for t in doc["traces"]] == [2, 2, 2]
    assert doc["traces"][0]["duration_ms"] >= doc["traces"][-1]["duration_ms"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_empty_file_says_no_traces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main_report([str(empty)]) == 0
    assert "no traces" in capsys.readouterr().out
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    assert main_report([str(blank), "--png", str(tmp_path / "x.png")]) == 0
    assert "no traces" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


def test_file_of_requests_without_spans_says_no_traces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "nospans.jsonl"
    f.write_text('{"resourceSpans": []}\n{}\n')
    assert main_report([str(f)]) == 0
    assert "no traces" in capsys.readouterr().out


@pytest.mark.parametrize("bad, lineno", [
    ("{not json", 3),
    ('{"resourceSpans": 5}', 3),
    ('{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz", "spanId": "00"}]}]}]}', 3),
    ("[1, 2]", 3),
])
def test_malformed_line_is_an_error_naming_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    bad: str, lineno: int) -> None:
    good = ('{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"a"}}]},'
            '"scopeSpans":[{"spans":[{"traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708",'
            '"name":"x","startTimeUnixNano":"1000","endTimeUnixNano":"5000"}]}]}]}')
    f = tmp_path / "bad.jsonl"
    f.write_text(f"{good}\n\n{bad}\n{good}\n")
    assert main_report([str(f)]) == 2
    err = capsys.readouterr().err
    assert f"bad.jsonl:{lineno}:" in err
    with pytest.raises(ReportError, match=f":{lineno}:"):
        load_spans(str(f))
    # The good lines on their own parse into one trace of one 4 µs span.
    spans = parse_lines([good, good])
    assert [s.duration_ns for s in spans] == [4000, 4000] and spans[0].service == "a"


def test_missing_and_binary_files_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_report([str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    b = tmp_path / "bin.jsonl"
    b.write_bytes(b"\xff\xfe\x00garbage")
    assert main_report([str(b)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main_report([str(b), "--top", "0"]) == 2
