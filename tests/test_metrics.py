"""test_metrics.py - in-process metrics in the Prometheus text format (recorded by training and
generation, the pool read at export), and JSON log lines."""
import io
import json
import logging
import re
import threading

import pytest

import smallmind as sm
from smallmind.metrics import JsonFormatter, Registry, configure_logging


def test_registry_types_labels_histograms_and_threads():
    r = Registry()
    r.inc("jobs_total", help="jobs done", kind='a"b')
    r.inc("jobs_total", 2, kind='a"b')
    r.set("temp", 1.5, help="a gauge")
    for v in (0.002, 0.3, 100.0):
        r.observe("lat_seconds", v, help="latency")
    text = r.render_prometheus()
    assert '# TYPE jobs_total counter\njobs_total{kind="a\\"b"} 3' in text
    assert "# TYPE temp gauge\ntemp 1.5" in text
    assert 'lat_seconds_bucket{le="0.005"} 1' in text and 'lat_seconds_bucket{le="0.5"} 2' in text
    assert 'lat_seconds_bucket{le="+Inf"} 3' in text and "lat_seconds_count 3" in text
    with pytest.raises(ValueError, match="counter"):
        r.set("jobs_total", 1)
    with pytest.raises(ValueError):
        r.inc("jobs_total", -1)
    ts = [threading.Thread(target=lambda: [r.inc("n_total") for _ in range(1000)]) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert r.get("n_total") == 8000 and r.get("lat_seconds") == 3
    for line in text.splitlines():           # every sample line parses as the format says
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{.*\})? [-+0-9.eInfa]+', line), line


def test_training_and_generation_are_recorded():
    reg = sm.metrics.REGISTRY
    steps0 = reg.get("smallmind_training_steps_total") or 0
    toks0 = reg.get("smallmind_generated_tokens_total") or 0
    tok = sm.Tokenizer("abc def " * 50)
    m = sm.TransformerModel(sm.ModelConfig(tok.vocab_size, 16, 1, 2, 16))
    sm.Training(m, tok, "abc def " * 50, batch_size=4).train(5, log_every=0)
    sm.Sampling(m.eval(), tok).generate("abc", 12, temperature=0)
    assert reg.get("smallmind_training_steps_total") == steps0 + 5
    assert reg.get("smallmind_generated_tokens_total") == toks0 + 12
    text = sm.metrics.render_prometheus()
    for name in ("smallmind_training_loss", "smallmind_training_tokens_per_second",
                 "smallmind_generation_seconds_count", "smallmind_time_to_first_token_seconds_sum",
                 "smallmind_pool_outstanding_bytes", "smallmind_pool_rents_total"):
        assert name in text
    assert 'smallmind_generations_total{finish_reason="length"}' in text
    src = sm.CancellationTokenSource()
    src.cancel()
    with pytest.raises(sm.CancelledError):
        sm.Sampling(m, tok).generate("abc", 12, cancel=src.token)
    assert reg.get("smallmind_generations_total", finish_reason="cancelled") >= 1
    m.dispose()        # give the training state back now, not whenever the collector runs


def test_json_logs(capsys):
    buf = io.StringIO()
    handler = configure_logging("INFO", json=True, stream=buf)
    try:
        logging.getLogger("smallmind.training").info("step %d done", 3, extra={"loss": 1.25})
        logging.getLogger("smallmind.sampling").debug("not shown")
    finally:
        logging.getLogger("smallmind").removeHandler(handler)
        logging.getLogger("smallmind").setLevel(logging.NOTSET)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["message"] == "step 3 done" and rec["logger"] == "smallmind.training"
    assert rec["level"] == "INFO" and rec["loss"] == 1.25 and rec["time"].endswith("Z")
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)
