"""Environment the daemon meets in a pod: kubelet service links are not configuration."""

from __future__ import annotations

import pytest

from isoscope.config import ConfigError, load_config

# What the kubelet injects for a Service `isoscope` (port 9464) and a Service `isoscope-metrics`
# (port named `metrics`) in the pod's namespace, with enableServiceLinks left on.
SERVICE_LINKS = {
    "ISOSCOPE_PORT": "tcp://10.96.0.10:9464",
    "ISOSCOPE_SERVICE_HOST": "10.96.0.10",
    "ISOSCOPE_SERVICE_PORT": "9464",
    "ISOSCOPE_PORT_9464_TCP": "tcp://10.96.0.10:9464",
    "ISOSCOPE_PORT_9464_TCP_ADDR": "10.96.0.10",
    "ISOSCOPE_PORT_9464_TCP_PORT": "9464",
    "ISOSCOPE_PORT_9464_TCP_PROTO": "tcp",
    "ISOSCOPE_METRICS_SERVICE_HOST": "10.96.0.11",
    "ISOSCOPE_METRICS_SERVICE_PORT": "9464",
    "ISOSCOPE_METRICS_SERVICE_PORT_METRICS": "9464",
    "ISOSCOPE_METRICS_PORT": "tcp://10.96.0.11:9464",
    "ISOSCOPE_METRICS_PORT_9464_TCP_ADDR": "10.96.0.11",
}


def test_service_link_variables_are_ignored_and_real_overrides_still_apply() -> None:
    cfg = load_config(env={**SERVICE_LINKS, "ISOSCOPE_LOG_LEVEL": "debug",
                           "ISOSCOPE_METRICS__LISTEN": "0.0.0.0:9464"})
    assert cfg.log_level == "debug"
    assert cfg.metrics.listen == "0.0.0.0:9464"


@pytest.mark.parametrize("name", ["ISOSCOPE_PORTS", "ISOSCOPE_SERVICE", "ISOSCOPE_METRICS__PORT"])
def test_names_that_only_look_like_service_links_are_still_checked(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(env={name: "1"})
