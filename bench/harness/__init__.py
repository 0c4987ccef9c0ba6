"""The project's test-and-bench harness: the one way the tests, `make demo` and `make bench`
start and stop real processes, and what they share to look at them.

    environment   the repo root, free loopback ports, the environments of a stack and of locust
    polling       waiting for a condition or a URL, with generous deadlines instead of sleeps
    commands      one-shot commands with a timeout (the CLI, migrations)
    process       ManagedProcess: own session, log file, readiness wait, stop by PID then SIGKILL
    gunicorn      the service under gunicorn with deploy/gunicorn.conf.py
    nginx         the project's nginx site rendered for a private nginx (make run-edge, tests,
                  the compose variant), and that nginx as a process
    prometheus    the real Prometheus with the repo's config and rules, and its query API
    alertmanager  the real Alertmanager with the repo's routes and templates, its receivers local
    receivers     a local SMTP server and webhook receiver that record every notification
    scrape        samples of a Prometheus text endpoint
    sentry_receiver  a local stand-in for Sentry's ingestion endpoint
    rsyslog       log shipping as deployed: an app host's forwarder and the log host's receiver

Import the modules themselves: this file imports nothing, so `import bench.harness` is cheap.
The harness never imports the test suite.
"""
