"""What `qnbd serve` runs beside the NBD listeners (issue 15): the control socket and the
metrics endpoint, as `services` of qnbd.nbd.server.serve (which knows nothing of them)."""

from ..control.service import control_service
from ..errors import QnbdError


def serve_services(config) -> list:
    services = []
    if config.metrics is not None:
        from ..control.metrics_http import metrics_service, parse_address
        services.append(metrics_service(*parse_address(config.metrics)))
    if config.control is not None:
        if not config.control.startswith("/"):
            raise QnbdError("control socket path must be absolute")
        from ..control.metrics import snapshot
        services.append(control_service(config.control, config.control_mode, snapshot))
    return services
