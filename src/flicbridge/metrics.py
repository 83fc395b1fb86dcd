"""Prometheus metrics, one registry per bridge (tests run several bridges in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Every ``flicbridge_*`` series; units in the names."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.presses = Counter(
            "flicbridge_presses",
            "Signals decided, by button, origin and decision",
            ["button", "origin", "decision"],
            registry=r,
        )
        self.dropped_presses = Counter(
            "flicbridge_presses_dropped",
            "Presses dropped as older than max_press_age",
            ["button"],
            registry=r,
        )
        self.deliveries = Counter(
            "flicbridge_deliveries",
            "Delivery attempts by sink and outcome",
            ["sink", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "flicbridge_retries", "Attempts that will be retried", ["sink"], registry=r
        )
        self.dead_letters = Counter(
            "flicbridge_dead_letters", "Rows dead-lettered", ["sink"], registry=r
        )
        self.queue_depth = Gauge(
            "flicbridge_queue_depth_rows", "Pending outbox rows", ["sink"], registry=r
        )
        self.oldest_pending = Gauge(
            "flicbridge_oldest_pending_age_seconds",
            "Age of the oldest pending row",
            ["sink"],
            registry=r,
        )
        self.latency = Histogram(
            "flicbridge_delivery_latency_seconds",
            "Press to 2xx at the sink",
            ["sink"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "flicbridge_store_commit_seconds",
            "Press to committed",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.store_healthy = Gauge(
            "flicbridge_store_healthy", "1 while the last commit succeeded", registry=r
        )
        self.source_up = Gauge(
            "flicbridge_source_connected",
            "1 while the source (flicd) is connected",
            ["source"],
            registry=r,
        )
        self.button_connected = Gauge(
            "flicbridge_button_connected",
            "1 while the button is in range",
            ["button"],
            registry=r,
        )
        self.battery = Gauge(
            "flicbridge_button_battery_percent", "Last battery report", ["button"], registry=r
        )
        self.acknowledgements = Counter(
            "flicbridge_acknowledgements",
            "Acknowledgements of open alerts, by button and source (pagerduty, api, ...)",
            ["button", "source"],
            registry=r,
        )
        self.time_to_ack = Histogram(
            "flicbridge_time_to_acknowledge_seconds",
            "From the alert's open to its acknowledgement",
            ["button"],
            buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600, 14400),
            registry=r,
        )
        self.store_healthy.set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
