"""``pipeline run STAGE``: one stage worker in the foreground."""

from __future__ import annotations

import faust

from pipeline import failpoints
from pipeline.kafka.clients import install_log_filter, wait_for_broker
from pipeline.obs import diagnostics, health
from pipeline.runtime.app import build_app, log
from pipeline.settings import Settings


def run_stage(settings: Settings, stage_id: str) -> None:
    """Run one stage worker in the foreground until SIGTERM/SIGINT.

    SIGQUIT logs a state dump (:mod:`pipeline.diagnostics`); SIGUSR1 makes mode log
    every thread's and task's stack.
    """
    if settings.metrics_port is not None:  # first, so probes answer while it connects
        port = health.serve(settings.metrics_host, settings.metrics_port)
        log.info(
            "stage %s: /metrics, /healthz, /readyz on http://%s:%d",
            stage_id,
            settings.metrics_host,
            port,
        )
    install_log_filter()
    failpoints.arm(settings.failpoint)
    wait_for_broker(settings, settings.runner.connect_timeout_s)
    app, binding = build_app(settings, stage_id)
    diagnostics.install(app)
    worker = faust.Worker(
        app, loglevel=settings.log_level.upper(), quiet=True, redirect_stdouts=False
    )
    # mode's terminal spinner sets the root logger to DEBUG whenever the level is
    # above INFO: every debug record of Faust and aiokafka was then built and
    # dropped (measured: ~9 % of a worker's CPU at log_level warning)
    worker.spinner = None
    run_events = app.run_events
    assert run_events is not None
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:  # mode exits 0 after SIGTERM, 1 after an exception
        if exc.code in (0, None) and not app.halted:
            run_events.complete()
        else:
            run_events.fail(
                "stopped by its dead-letter budget"
                if app.halted
                else f"worker exited with code {exc.code}"
            )
        raise
    except BaseException as exc:
        run_events.fail(f"stage {stage_id}: {exc!r}")
        raise
    finally:
        binding.close()
