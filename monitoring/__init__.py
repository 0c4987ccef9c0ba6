"""What a Prometheus, an Alertmanager and a Grafana need; only `slo` is Python (the SLO rules'
generator, `python -m monitoring.slo`)."""
